"""Pages and API reads cost the same number of database queries with 3 tasks as with 30, and
with 1 bid per task as with 3: every list is read a page at a time, nothing row by row. The
task lists, and a task's page and API detail, are read from the database once per change of
their tasks, then from the cache."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from eth_account import Account

from chain.events import Role
from marketplace.sync import chain_sync
from marketplace.sync.push import task_push_next
from marketplace.task_lists import task_lists_changed
from marketplace.views import TASK_TABLES
from tests.conftest import MIN_PRICE_WEI
from tests.marketplace.buyers import client_for
from tests.marketplace.people import buyer_signup, device_enrol, task_post

pytestmark = pytest.mark.django_db


class Market:
    """A buyer's tasks and devices' bids on them, made through the services and the chain and
    mirrored by chain sync, with one order more that sync has not seen (state pending)."""

    def __init__(self, market) -> None:
        self.market = market
        self.buyer = buyer_signup("ada")
        self.aggregator = Account.create()
        device_enrol(self.aggregator, name="gpu-box", may_aggregate=True)
        self.trainers = [Account.create() for _ in range(2)]
        for i, account in enumerate(self.trainers):
            device_enrol(account, name=f"phone-{i}")
        self.task_ids: list[int] = []
        self.bids: set[tuple[int, str]] = set()
        self.pending: int | None = None

    def grow(self, *, tasks: int, bidders: int) -> None:
        """``tasks`` mirrored tasks (the order left pending last time among them), each with
        bids from the first ``bidders`` devices, the aggregator first; then one order more."""
        if self.pending is not None:
            self.task_ids.append(self.pending)
        while len(self.task_ids) < tasks:
            self.task_ids.append(task_post(self.buyer, title="posted").chain_task_id)
        devices = [(self.aggregator, Role.AGGREGATOR)] + [(t, Role.TRAINER) for t in self.trainers]
        for task_id in self.task_ids:
            for account, role in devices[:bidders]:
                if (task_id, account.address) not in self.bids:
                    self.market.place_bid(
                        sender=account,
                        task_id=task_id,
                        price_per_round_wei=MIN_PRICE_WEI,
                        samples=100,
                        role=role,
                    )
                    self.bids.add((task_id, account.address))
        assert chain_sync().status == "synced"
        self.pending = task_post(self.buyer, title="not mirrored yet").chain_task_id


def queries(client, path: str, **params) -> int:
    """The number of queries one request for ``path`` makes (it must answer 200)."""
    with CaptureQueriesContext(connection) as captured:
        response = client.get(path, params)
    assert response.status_code == 200, (path, response.content[:300])
    return len(captured.captured_queries)


def queries_after_change(client, path: str, buyer, **params) -> int:
    """The queries of a request right after a task of ``buyer`` changed: lists read afresh."""
    task_lists_changed(buyer_ids=[buyer.pk])
    return queries(client, path, **params)


# What shows one task's snapshot (marketplace.task_page.task_snapshot).
TASK_READS = ("task detail page", "model card", "API task detail")


def test_pages_and_api_lists_cost_the_same_queries_at_3_and_at_30_tasks(
    platform_market, chain_rewound, admin_user
):
    world = Market(platform_market)
    buyer_page, staff_page = Client(), Client()
    buyer_page.force_login(world.buyer)
    staff_page.force_login(admin_user)
    buyer_api, staff_api = client_for(world.buyer), client_for(admin_user)

    def measure() -> dict[str, int]:
        newest = world.task_ids[-1]
        device = world.aggregator.address
        reads = {
            "task list page": (buyer_page, reverse("task-list"), {}),
            "task list page, filtered and sorted": (
                buyer_page,
                reverse("task-list"),
                {"state": "bidding", "sort": "oldest"},
            ),
            "task detail page": (buyer_page, reverse("task-detail", args=[newest]), {}),
            "model card": (buyer_page, reverse("task-model", args=[newest]), {}),
            "device page": (staff_page, reverse("device-page", args=[device]), {}),
            "API task list": (buyer_api, "/api/tasks/", {}),
            "API task detail": (buyer_api, f"/api/tasks/{newest}/", {}),
            "API updates of a task": (buyer_api, f"/api/tasks/{newest}/updates/", {}),
            "API transactions of a task": (buyer_api, f"/api/tasks/{newest}/transactions/", {}),
            "API bid list": (buyer_api, "/api/bids/", {}),
            "API bids of a task": (buyer_api, "/api/bids/", {"task": newest}),
            "API open tasks": (buyer_api, "/api/open-tasks/", {}),
            "API devices": (staff_api, "/api/devices/", {}),
        }
        for client, path, params in reads.values():  # first requests fill Django's caches
            queries(client, path, **params)
        counts = {name: queries(c, path, **params) for name, (c, path, params) in reads.items()}
        for name in ("task list page", "task list page, filtered and sorted", "API task list"):
            client, path, params = reads[name]
            counts[f"{name}, after a change"] = queries_after_change(
                client, path, world.buyer, **params
            )
        for name in TASK_READS:
            client, path, params = reads[name]
            task_push_next(chain_task_id=newest)  # a change, numbered as chain sync numbers it
            counts[f"{name}, after a change"] = queries(client, path, **params)
        return counts

    world.grow(tasks=3, bidders=1)
    small = measure()
    world.grow(tasks=30, bidders=3)
    large = measure()

    assert large == small
    # The large world really is larger where it is read: full pages, more bids per task.
    listed = buyer_api.get("/api/tasks/").json()
    assert (listed["count"], len(listed["results"])) == (31, 25)
    assert len(buyer_api.get(f"/api/tasks/{world.task_ids[-1]}/").json()["bids"]) == 3
    assert buyer_api.get("/api/bids/").json()["count"] == 90
    device_page = reverse("device-page", args=[world.aggregator.address])
    assert staff_page.get(device_page).context["st"]["bids"] == 30
    # Served from the cache until a task changes, the task lists read no task, and a task's
    # pages and API detail none of its rows.
    for name in ("task list page", "API task list", *TASK_READS):
        assert large[name] < large[f"{name}, after a change"]
    # The second page of each list costs what the first does.
    page_2 = queries_after_change(buyer_page, reverse("task-list"), world.buyer, page=2)
    assert page_2 == small["task list page, after a change"]
    page_2 = queries_after_change(buyer_api, "/api/tasks/", world.buyer, page=2)
    assert page_2 == small["API task list, after a change"]
    assert queries(staff_page, device_page, page=2) == small["device page"]


def test_a_task_page_and_its_api_detail_show_a_change_of_the_task_at_once(
    platform_market, chain_rewound
):
    world = Market(platform_market)
    world.grow(tasks=1, bidders=1)
    task_id = world.task_ids[-1]
    page = Client()
    page.force_login(world.buyer)
    api = client_for(world.buyer)
    detail, page_path = f"/api/tasks/{task_id}/", reverse("task-detail", args=[task_id])
    first = api.get(detail).json()
    assert [b["device"] for b in first["bids"]] == [world.aggregator.address]
    assert api.get(detail).json() == first  # served again as it was
    shown = page.get(page_path)
    assert shown.context["s"]["bid_count"] == 1
    assert TASK_TABLES in tables_rendered(shown)
    again = page.get(page_path)  # its tables served again as they were rendered
    assert TASK_TABLES not in tables_rendered(again)
    assert tables_of(again) == tables_of(shown)
    assert world.trainers[0].address not in tables_of(again)

    world.grow(tasks=1, bidders=2)  # a trainer's bid, mirrored by chain sync

    bids = [b["device"] for b in api.get(detail).json()["bids"]]
    assert bids == [world.aggregator.address, world.trainers[0].address]
    changed = page.get(page_path)
    assert changed.context["s"]["bid_count"] == 2
    assert TASK_TABLES in tables_rendered(changed)
    assert f'title="{world.trainers[0].address}"' in tables_of(changed)


def tables_rendered(response) -> list[str]:
    return [t.name for t in response.templates]


def tables_of(response) -> str:
    """The task page's tables, as served (the page around them holds a fresh CSRF token)."""
    html = response.content.decode()
    return html[html.index('<div class="split"') : html.index('id="task-data"')]


def test_orders_not_mirrored_yet_each_show_their_own_tables(platform_market, chain_rewound):
    """An order chain sync has not mirrored has no numbered changes: its page is rendered
    whole each time, never from another order's tables."""
    world = Market(platform_market)
    world.grow(tasks=1, bidders=1)
    other = task_post(world.buyer, title="three rounds", rounds=3, dispute_window_s=120)
    page = Client()
    page.force_login(world.buyer)
    # Before chain sync has seen them, the terms are the buyer's order: the page and the
    # buyer's first look at it show the dispute terms that were sent, not a default.
    one = (world.pending, 1, "none: no global model can be challenged")
    three = (other.chain_task_id, 3, "120 s after each global model")
    for task_id, rounds, window in (one, three, one, three):
        shown = page.get(reverse("task-detail", args=[task_id]))
        assert shown.context["s"]["state"] == "pending"
        assert TASK_TABLES in tables_rendered(shown)
        assert f"<dt>Rounds</dt><dd>{rounds}</dd>" in shown.content.decode()
        assert f"<dt>Dispute window</dt><dd>{window}</dd>" in tables_of(shown)
        assert "<dt>Samples counted</dt><dd>at most 1000 per trainer</dd>" in tables_of(shown)
