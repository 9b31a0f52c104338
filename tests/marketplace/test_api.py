"""The REST API: authentication, who sees what, pagination, errors, schema and docs."""

from __future__ import annotations

import io
import re
import time
from datetime import timedelta

import numpy as np
import pytest
from django.contrib.staticfiles import finders
from django.core.cache import cache
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from drf_spectacular.validation import validate_schema
from rest_framework.test import APIClient

from dataplane.signing import sign_request
from marketplace import selectors, wallets
from marketplace.models import Bid, Task, TaskOrder
from marketplace.services import device_revoke
from marketplace.sync import chain_sync
from marketplace.wallets import wallet_of
from tests.conftest import MIN_PRICE_WEI
from tests.marketplace.buyers import (
    BUDGET_WEI,
    PASSWORD,
    SPEC,
    assert_error,
    client_for,
    make_task,
)
from tests.marketplace.test_admin import enrol_device
from training import validation
from training.spec import TaskSpec
from training.validation import validation_id

pytestmark = pytest.mark.django_db


# ---------------------------------------------------------------- authentication


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/tasks/"),
        ("get", "/api/tasks/1/"),
        ("get", "/api/tasks/1/model/"),
        ("get", "/api/tasks/1/updates/"),
        ("get", "/api/tasks/1/transactions/"),
        ("post", "/api/tasks/create/"),
        ("get", "/api/bids/"),
        ("get", "/api/devices/"),
        ("get", "/api/open-tasks/"),
    ],
)
def test_unauthenticated_requests_are_refused(method, path):
    response = getattr(APIClient(), method)(path)
    assert_error(response, 401, "not_authenticated")
    assert response.headers["WWW-Authenticate"]


def test_token_from_username_and_password_authenticates(alice, bob):
    own = make_task(alice, title="alice's")
    make_task(bob, title="bob's")
    client = APIClient()

    reply = client.post("/api/auth/token/", {"username": "alice", "password": PASSWORD})

    assert reply.status_code == 200
    token = reply.json()["token"]
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    listing = client.get("/api/tasks/").json()
    assert [t["id"] for t in listing["results"]] == [own.chain_task_id]
    assert listing["results"][0]["buyer"] == "alice"
    assert listing["results"][0]["budget_wei"] == str(BUDGET_WEI)


def test_wrong_password_and_bad_token_are_refused(alice):
    client = APIClient()
    body = assert_error(
        client.post("/api/auth/token/", {"username": "alice", "password": "nope"}), 400, "invalid"
    )
    assert "non_field_errors" in body["fields"]
    client.credentials(HTTP_AUTHORIZATION="Token " + "0" * 40)
    assert_error(client.get("/api/tasks/"), 401, "authentication_failed")


def test_session_authentication_works(alice):
    client = APIClient()
    assert client.login(username="alice", password=PASSWORD)
    assert client.get("/api/tasks/").status_code == 200


# ---------------------------------------------------------------- tasks: who sees what


def test_another_buyers_task_is_refused_and_staff_see_it(alice, bob, admin_user):
    task = make_task(alice)
    path = f"/api/tasks/{task.chain_task_id}/"

    # Someone else's task is not found: nobody learns that it exists.
    assert_error(client_for(bob).get(path), 404, "not_found")
    assert [t["id"] for t in client_for(bob).get("/api/tasks/").json()["results"]] == []

    own = client_for(alice).get(path)
    assert own.status_code == 200
    detail = own.json()
    assert (detail["id"], detail["state"]) == (task.chain_task_id, "pending")
    assert detail["spec"]["model"] == "digits-mlp"
    # A spec without a validation set is scored on its schema's bundled held-out split.
    bundled = validation_id(validation.bundled(schema="digits-8x8"))
    assert detail["spec"]["validation"] == bundled
    assert detail["spec_hash"] == TaskSpec.from_dict({**SPEC, "validation": bundled}).hash_hex
    lists = ("bids", "selected", "rounds_published", "updates", "transactions", "payouts")
    for nested in (*lists, "contributions"):
        assert detail[nested] == []

    assert client_for(admin_user).get(path).status_code == 200
    staff_list = client_for(admin_user).get("/api/tasks/").json()
    assert task.chain_task_id in [t["id"] for t in staff_list["results"]]
    assert_error(client_for(alice).get("/api/tasks/999999/"), 404, "not_found")
    assert [
        t["id"] for t in client_for(alice).get("/api/tasks/?state=bidding").json()["results"]
    ] == []
    assert client_for(alice).get("/api/tasks/?state=pending").json()["count"] == 1

    chain_sync()
    mirrored = client_for(alice).get(path).json()
    assert (mirrored["id"], mirrored["state"], mirrored["title"]) == (
        task.chain_task_id,
        "bidding",
        "digits",
    )
    assert [t["name"] for t in mirrored["transactions"]] == ["TaskCreated", "DisputeTermsSet"]
    assert_error(client_for(bob).get(path), 404, "not_found")
    assert client_for(alice).get("/api/tasks/?state=pending").json()["count"] == 0
    assert client_for(alice).get("/api/tasks/?state=bidding").json()["count"] == 1
    body = assert_error(client_for(alice).get("/api/tasks/?state=lost"), 400, "invalid")
    assert list(body["fields"]) == ["state"]


def test_model_download_is_the_buyers_alone(alice, bob, admin_user):
    task = make_task(alice)
    path = f"/api/tasks/{task.chain_task_id}/model/"

    assert_error(client_for(bob).get(path), 404, "not_found")
    # Fetched with the buyer's own key, so not even staff download it in the buyer's name.
    assert_error(client_for(admin_user).get(path), 403, "not_task_buyer")
    body = assert_error(client_for(alice).get(path), 409, "model_not_ready")
    assert body["fields"]["state"] == "pending"
    chain_sync()
    assert_error(client_for(admin_user).get(path), 403, "not_task_buyer")
    body = assert_error(client_for(alice).get(path), 409, "model_not_ready")
    assert body["fields"]["state"] == "bidding"


def test_task_list_is_paginated(alice):
    for i in range(26):
        make_task(alice, title=f"t{i}")
    client = client_for(alice)

    first = client.get("/api/tasks/").json()
    assert first["count"] == 26
    assert len(first["results"]) == 25
    assert first["previous"] is None
    assert first["next"].endswith("/api/tasks/?page=2")
    second = client.get("/api/tasks/", {"page": 2}).json()
    assert [t["title"] for t in second["results"]] == ["t0"]  # newest first
    assert_error(client.get("/api/tasks/", {"page": 3}), 404, "not_found")

    chain_sync()  # mirrored now: the same pages, read from the mirror
    make_task(alice, title="newest")  # ordered, not mirrored yet: listed first
    first = client.get("/api/tasks/").json()
    assert first["count"] == 27
    assert [(t["title"], t["state"]) for t in first["results"][:2]] == [
        ("newest", "pending"),
        ("t25", "bidding"),
    ]
    second = client.get("/api/tasks/", {"page": 2}).json()
    assert [t["title"] for t in second["results"]] == ["t1", "t0"]


def test_task_detail_carries_the_mirrored_trade(alice, finished):
    task = finished[Task]

    detail = client_for(alice).get(f"/api/tasks/{task.chain_task_id}/").json()

    assert detail["state"] == "finalized"
    assert sorted(b["role"] for b in detail["bids"]) == ["aggregator", "trainer"]
    assert sorted(s["role"] for s in detail["selected"]) == ["aggregator", "trainer"]
    assert [r["number"] for r in detail["rounds_published"]] == [0, 1]
    assert detail["rounds_published"][1]["global_model_id"] == "0x" + "33" * 32
    assert detail["rounds_published"][1]["accuracy"] == 0.5  # as the aggregator reported it
    assert [u["train_s"] for u in detail["updates"]] == [1.0]  # as the trainer reported it
    # Escrow is conserved: trainer pay, aggregator fee and refund add up to the budget (the
    # stakes and bond come back beside them).
    spent = [p for p in detail["payouts"] if p["reason"] in {"trainer", "aggregator", "refund"}]
    assert sum(int(p["amount_wei"]) for p in spent) == int(detail["budget_wei"])
    assert {p["reason"] for p in detail["payouts"]} >= {"trainer", "aggregator"}
    listed = client_for(alice).get("/api/open-tasks/").json()["results"]
    assert task.chain_task_id not in [t["id"] for t in listed]
    # The score the aggregator published with round 1, and the pay the contract credited.
    assert detail["rounds_published"][1]["scores"] == [7]
    [trainer] = detail["contributions"]
    paid = [p for p in detail["payouts"] if p["reason"] == "trainer"]
    assert trainer == {
        "trainer": finished["trainer"].address,
        "position": 0,
        "price_per_round_wei": str(MIN_PRICE_WEI),
        "rounds": [
            {"round": 0, "aggregated": True, "left_out": None, "score": 7, "share_bp": 10_000}
        ],
        "rounds_aggregated": 1,
        "paid_wei": paid[0]["amount_wei"],
    }


def every_row(client, path: str) -> list[dict]:
    """Every row of an API list, read page after page."""
    rows, page = [], client.get(path, {"page_size": 2}).json()
    rows += page["results"]
    while page["next"]:
        page = client.get(page["next"]).json()
        rows += page["results"]
    return rows


def test_task_detail_carries_its_latest_rows_and_its_lists_every_row(
    alice, bob, admin_user, finished, monkeypatch
):
    """At the contract's limits a task has 12,800 updates and as many transactions: its
    detail (and page, and the live page's snapshot) carries the latest of them with their
    totals, and every row is read a page at a time."""
    task = finished[Task]
    detail_path = f"/api/tasks/{task.chain_task_id}/"
    client = client_for(alice)
    events = every_row(client, detail_path + "transactions/")
    updates = every_row(client, detail_path + "updates/")
    in_order = list(dict.fromkeys(e["tx_hash"] for e in events))
    assert [e["name"] for e in events][:2] == ["TaskCreated", "DisputeTermsSet"]
    assert events[-1]["name"] == "PaymentCredited"
    assert [(u["round"], u["train_s"]) for u in updates] == [(0, 1.0)]

    bids = every_row(client, f"/api/bids/?task={task.chain_task_id}")

    # A small task is shown whole.
    detail = client.get(detail_path).json()
    assert (detail["transactions"], detail["transaction_count"]) == (events, len(in_order))
    assert (detail["updates"], detail["update_count"]) == (updates, 1)
    assert (detail["bids"], detail["bid_count"]) == (bids, 2)

    # A long one, its latest bids, its latest transactions whole (every event of each) and
    # the updates of its last rounds.
    monkeypatch.setattr(selectors, "BIDS_SHOWN", 1)
    monkeypatch.setattr(selectors, "TRANSACTIONS_SHOWN", 3)
    monkeypatch.setattr(selectors, "UPDATE_ROUNDS_SHOWN", 1)
    cache.clear()  # the snapshot built above is kept until the task changes
    detail = client.get(detail_path).json()
    assert (detail["bids"], detail["bid_count"]) == (bids[-1:], 2)
    assert detail["transactions"] == [e for e in events if e["tx_hash"] in in_order[-3:]]
    assert detail["transaction_count"] == len(in_order) > 3
    assert (detail["updates"], detail["update_count"]) == ([], 1)  # round 0 is not the last
    page = Client()
    page.force_login(alice)
    shown = page.get(reverse("task-detail", args=[task.chain_task_id])).content.decode()
    assert f"the latest 3 of {len(in_order)}" in shown
    assert f'href="{detail_path}transactions/"' in shown
    assert "the latest 1 of 2" in shown
    assert f'href="/api/bids/?task={task.chain_task_id}"' in shown

    # Only the buyer and staff read them.
    for path in (detail_path + "transactions/", detail_path + "updates/"):
        assert_error(client_for(bob).get(path), 404, "not_found")
        assert client_for(admin_user).get(path).json()["count"] == len(
            events if "transactions" in path else updates
        )
    assert_error(client.get("/api/tasks/999999/updates/"), 404, "not_found")


def _npz(x, y) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    return buffer.getvalue()


def test_bids_are_shown_to_the_tasks_buyer_and_staff(alice, bob, admin_user, finished):
    task = finished[Task]
    bid = Bid.objects.filter(task=task).first()

    own = client_for(alice).get("/api/bids/", {"task": task.chain_task_id}).json()
    assert own["count"] == 2
    assert {b["price_per_round_wei"] for b in own["results"]} == {str(MIN_PRICE_WEI)}
    assert client_for(bob).get("/api/bids/").json()["count"] == 0
    assert_error(client_for(bob).get(f"/api/bids/{bid.pk}/"), 404, "not_found")
    assert client_for(admin_user).get(f"/api/bids/{bid.pk}/").json()["device"] == bid.device
    # Staff see every bid the mirror holds (the session chain has other tests' too).
    assert client_for(admin_user).get("/api/bids/").json()["count"] == Bid.objects.count()
    body = assert_error(client_for(alice).get("/api/bids/", {"task": "x"}), 400, "invalid")
    assert list(body["fields"]) == ["task"]


# ---------------------------------------------------------------- task create


def _create_body(**overrides) -> dict:
    return {
        "title": "via the API",
        "spec": SPEC,
        "budget_wei": str(BUDGET_WEI),
        "min_trainers": 1,
        "max_trainers": 2,
        "bidding_window_s": 600,
        "round_timeout_s": 300,
        **overrides,
    }


def test_task_create_posts_the_task_on_chain(alice, platform_market):
    response = client_for(alice).post("/api/tasks/create/", _create_body(), format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["title"] == "via the API"
    assert body["budget_wei"] == str(BUDGET_WEI)
    assert body["state"] == "pending"  # ordered; chain sync mirrors it when it sees it
    on_chain = platform_market.task(task_id=body["id"])
    assert on_chain.budget_wei == BUDGET_WEI
    assert on_chain.buyer == wallet_of(user=alice).address
    assert on_chain.sample_cap == 1000  # the default when none is given
    assert "0x" + on_chain.spec_hash.removeprefix("0x") == body["spec_hash"]


def test_a_buyer_caps_the_samples_a_trainer_claim_counts_for(alice, platform_market):
    response = client_for(alice).post(
        "/api/tasks/create/", _create_body(sample_cap=64), format="json"
    )

    assert response.status_code == 201, response.content
    # The answer has the terms as sent, before chain sync has mirrored the task.
    assert response.json()["state"] == "pending"
    assert response.json()["sample_cap"] == 64
    assert platform_market.task(task_id=response.json()["id"]).sample_cap == 64


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"budget_wei": "-5"}, "budget_wei"),
        ({"budget_wei": -5}, "budget_wei"),
        ({"budget_wei": 1.5e16}, "budget_wei"),
        ({"budget_wei": "ten"}, "budget_wei"),
        ({"spec": {**SPEC, "rounds": 0}}, "spec"),
        ({"spec": {"model": "digits-mlp"}}, "spec"),
        ({"min_trainers": 3, "max_trainers": 2}, "max_trainers"),
        ({"bidding_window_s": None}, "bidding_window_s"),
        ({"round_timeout_s": 0}, "round_timeout_s"),
        ({"sample_cap": 0}, "sample_cap"),
        ({"sample_cap": 2**24 + 1}, "sample_cap"),
    ],
)
def test_task_create_names_the_bad_field(alice, overrides, field):
    body = _create_body(**overrides)
    if overrides.get("bidding_window_s", 0) is None:
        del body["bidding_window_s"]
        field = "bidding_ends"
    count = TaskOrder.objects.count()

    response = client_for(alice).post("/api/tasks/create/", body, format="json")

    error = assert_error(response, 400, "invalid")
    assert list(error["fields"]) == [field]
    assert TaskOrder.objects.count() == count


def test_task_create_below_the_contracts_minimum_is_refused_with_its_error(alice):
    response = client_for(alice).post(
        "/api/tasks/create/", _create_body(budget_wei="1"), format="json"
    )
    body = assert_error(response, 409, "budget_too_low")
    assert body["fields"]["budget_wei"] == "1"
    assert int(body["fields"]["minimum_wei"]) > 1
    assert not TaskOrder.objects.exists()


def test_task_create_beyond_the_wallet_is_refused_with_its_wei_exact(alice):
    budget = 10**23 + 1  # more than the wallet holds, and past JSON's exact numbers
    response = client_for(alice).post(
        "/api/tasks/create/", _create_body(budget_wei=str(budget)), format="json"
    )
    fields = assert_error(response, 409, "insufficient_funds")["fields"]
    assert fields["budget_wei"] == str(budget)
    assert fields["balance_wei"] == str(wallets.wallet_balance_wei(wallet=alice.wallet))
    assert int(fields["needed_wei"]) > budget
    assert not TaskOrder.objects.exists()


# ---------------------------------------------------------------- devices


def test_devices_show_the_public_only_what_the_chain_shows(alice, admin_user):
    device = enrol_device(name="secret-lab-box", device_class="gpu", may_aggregate=True)

    public = client_for(alice).get("/api/devices/").json()["results"]
    staff = client_for(admin_user).get(f"/api/devices/{device.pk}/").json()

    assert public == [
        {
            "id": device.pk,
            "address": device.address,
            "device_class": "gpu",
            "may_aggregate": True,
            "chain_status": device.chain_status,
        }
    ]
    assert staff["name"] == "secret-lab-box"
    assert staff["join_token"] == "secret-lab-box"
    assert staff["registration_tx"] == device.registration_tx


# ---------------------------------------------------------------- open tasks, for devices


def open_tasks(client) -> list[dict]:
    """Every page of the open-task list (the session's chain holds earlier tests' tasks too,
    and chain sync mirrors them all)."""
    url, found = "/api/open-tasks/", []
    while url:
        body = client.get(url).json()
        found += body["results"]
        url = body["next"]
    return found


def _signed(device, path: str, market, *, host: str = "testserver", **kw) -> dict[str, str]:
    return sign_request(
        account=device.account,
        method="GET",
        url=f"http://{host}{path}",
        server_address=market.address,
        **kw,
    )


def test_an_enrolled_device_reads_open_tasks_with_a_signed_request(alice, platform_market):
    task = make_task(alice, title="open")
    device = enrol_device(name="trainer")
    chain_sync()
    path = "/api/open-tasks/"

    response = APIClient().get(path, headers=_signed(device, path, platform_market))

    assert response.status_code == 200, response.content
    # Buyers may read the same list with their own credentials.
    assert response.json() == client_for(alice).get(path).json()
    [listed] = [t for t in open_tasks(client_for(alice)) if t["id"] == task.chain_task_id]
    assert listed["title"] == "open"
    assert {k: listed["spec"][k] for k in SPEC} == SPEC  # the order's spec, to judge by
    assert listed["budget_wei"] == str(BUDGET_WEI)
    assert listed["bid_count"] == 0
    assert "buyer" not in listed


def test_device_signatures_are_checked(alice, platform_market):
    make_task(alice)
    device = enrol_device(name="trainer")
    client = APIClient()
    path = "/api/open-tasks/"

    # Signed for another path (here: another page), another server, or too long ago.
    other_path = _signed(device, path + "?page=2", platform_market)
    assert_error(client.get(path, headers=other_path), 401, "auth_bad_signature")
    other_server = sign_request(
        account=device.account,
        method="GET",
        url=f"http://testserver{path}",
        server_address=device.address,
    )
    assert_error(client.get(path, headers=other_server), 401, "auth_bad_signature")
    stale = _signed(device, path, platform_market, timestamp=int(time.time()) - 600)
    assert_error(client.get(path, headers=stale), 401, "auth_expired")
    # Signed for another host: a request captured on its way elsewhere is no good here.
    other_host = _signed(device, path, platform_market, host="flex.example.org")
    assert_error(client.get(path, headers=other_host), 401, "auth_bad_signature")
    # A request is good once: replayed, even to the same path, it is refused.
    once = _signed(device, path, platform_market)
    assert client.get(path, headers=once).status_code == 200
    assert_error(client.get(path, headers=once), 401, "auth_replayed")
    # A well-signed request from a key that is not an enrolled device.
    stranger = enrol_device(name="stranger")
    headers = _signed(stranger, path, platform_market)
    stranger.delete()
    assert_error(client.get(path, headers=headers), 401, "device_unknown")
    # A revoked device is refused, once chain sync has seen the revocation.
    device_revoke(device=device)
    chain_sync()
    revoked = _signed(device, path, platform_market)
    assert_error(client.get(path, headers=revoked), 401, "device_unknown")


def test_devices_only_read_open_tasks(alice, platform_market):
    task = make_task(alice)
    device = enrol_device(name="trainer")
    path = f"/api/tasks/{task.chain_task_id}/"
    response = APIClient().get(path, headers=_signed(device, path, platform_market))
    assert_error(response, 401, "not_authenticated")


def test_tasks_past_their_bidding_deadline_are_not_open(alice, platform_market):
    closed = make_task(alice, title="closed")
    still_open = make_task(alice, title="open")
    chain_sync()
    # As if its bidding window had run out (waiting it out would cost the test seconds).
    Task.objects.filter(chain_task_id=closed.chain_task_id).update(
        bidding_ends=timezone.now() - timedelta(seconds=1)
    )
    listed = [t["id"] for t in open_tasks(client_for(alice))]
    assert still_open.chain_task_id in listed
    assert closed.chain_task_id not in listed


# ---------------------------------------------------------------- schema and docs


def test_schema_is_valid_openapi_and_documents_every_endpoint():
    response = APIClient().get("/api/schema/", {"format": "json"})

    assert response.status_code == 200
    schema = response.json()
    validate_schema(schema)
    assert schema["openapi"].startswith("3.")
    for path in (
        "/api/tasks/",
        "/api/tasks/create/",
        "/api/tasks/{id}/",
        "/api/tasks/{id}/model/",
        "/api/bids/",
        "/api/devices/",
        "/api/open-tasks/",
        "/api/auth/token/",
    ):
        assert path in schema["paths"], path
    schemes = schema["components"]["securitySchemes"]
    assert {"tokenAuth", "cookieAuth", "deviceSignature"} <= set(schemes)


def test_docs_page_renders_swagger_ui_from_local_assets():
    response = APIClient().get("/api/docs/")

    assert response.status_code == 200
    html = response.content.decode()
    assert "/api/schema/" in html
    assets = re.findall(r'(?:src|href)="/static/([^"]+)"', html)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets)
    assert "cdn" not in " ".join(assets)
    for asset in assets:
        assert finders.find(asset), f"{asset} is not served from the installed sidecar"
