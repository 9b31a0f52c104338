"""The live task page's WebSocket, through the real ASGI stack and Redis channel layer: the
buyer gets the snapshot, then each round as it is mirrored; nobody else gets anything."""

from __future__ import annotations

import uuid

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client

from chain.events import Role
from core.messages import RoundReport
from flexsite.asgi import application
from marketplace import contract
from marketplace.consumers import CLOSE_FORBIDDEN
from marketplace.tasks import round_report_record
from tests.marketplace.test_lifecycle import enrol, model_id, selected_task, sync
from tests.marketplace.test_sync import mirror_env  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT_S = 10


def _headers(user=None, origin: str = "http://localhost") -> list[tuple[bytes, bytes]]:
    """A browser on ``origin``; logged in as ``user`` (its session cookie) if given."""
    headers = [(b"origin", origin.encode())]
    if user is not None:
        client = Client()
        client.force_login(user)
        cookie = (
            f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
        )
        headers.append((b"cookie", cookie.encode()))
    return headers


def test_the_buyer_sees_the_snapshot_then_each_round(platform_market, mirror_env):  # noqa: F811
    market = platform_market
    aggregator = enrol("aggregator", aggregate=True)
    trainer = enrol("dave")
    task = selected_task(market, aggregator, [trainer])
    sync()
    initial = model_id("initial")
    published = market.publish_global_model(
        sender=aggregator.account, task_id=task.chain_task_id, round_number=0, model_id=initial
    )

    headers = _headers(task.buyer)

    async def follow() -> tuple[dict, dict, dict]:
        socket = WebsocketCommunicator(
            application, f"/ws/tasks/{task.chain_task_id}/", headers=headers
        )
        connected, _ = await socket.connect()
        assert connected
        on_connect = await socket.receive_json_from(timeout=TIMEOUT_S)
        await sync_to_async(sync)()
        mirrored = await socket.receive_json_from(timeout=TIMEOUT_S)
        # What the aggregator reports after publishing, as the gateway hands it on.
        report = RoundReport.of(
            contract.deployment_identity(),
            device=aggregator.address,
            task_id=task.chain_task_id,
            round_number=0,
            model_id=initial,
            tx_hash=published.tx_hash,
            gas_used=published.gas_used,
            accuracy=0.1,
            loss=2.3,
            updates=0,
            aggregate_s=0.0,
        ).sign(aggregator.account)
        await sync_to_async(round_report_record)(message=report.dump())
        measured = await socket.receive_json_from(timeout=TIMEOUT_S)
        await socket.disconnect()
        return on_connect, mirrored, measured

    on_connect, mirrored, measured = async_to_sync(follow)()

    assert on_connect["type"] == "task.update"
    snapshot = on_connect["snapshot"]
    assert (snapshot["id"], snapshot["state"], snapshot["rounds_published"]) == (
        task.chain_task_id,
        "running",
        [],
    )
    assert snapshot["title"] == task.title
    # What the page shows is computed on the server and sent with it: names, steps.
    assert on_connect["view"]["device_names"] == {
        aggregator.address: "aggregator",
        trainer.address: "dave",
    }
    assert [s["status"] for s in on_connect["view"]["steps"]] == ["done", "done", "now", "", ""]
    assert {b["device"]: b["role"] for b in snapshot["bids"]} == {
        aggregator.address: Role.AGGREGATOR.name.lower(),
        trainer.address: Role.TRAINER.name.lower(),
    }
    assert [n["device"] for n in snapshot["selected"]] == [aggregator.address, trainer.address]
    assert [t["name"] for t in snapshot["transactions"]] == [
        "TaskCreated",
        "BidPlaced",
        "BidPlaced",
        "NodesSelected",
    ]
    assert snapshot["budget_wei"] == str(task.budget_wei)

    [round_0] = mirrored["snapshot"]["rounds_published"]
    assert round_0["number"] == 0
    assert round_0["global_model_id"] == initial
    assert round_0["tx_hash"] == published.tx_hash
    assert round_0["accuracy"] is None
    assert mirrored["snapshot"]["transactions"][-1]["name"] == "GlobalModelPublished"

    [round_0] = measured["snapshot"]["rounds_published"]
    assert (round_0["accuracy"], round_0["loss"], round_0["gas_used"]) == (
        0.1,
        2.3,
        published.gas_used,
    )


def test_only_the_buyer_and_staff_may_watch(platform_market, mirror_env):  # noqa: F811
    aggregator = enrol("aggregator", aggregate=True)
    task = selected_task(platform_market, aggregator, [enrol("erin")])
    users = get_user_model().objects
    stranger = users.create_user(username=f"stranger-{uuid.uuid4().hex[:6]}", password="x" * 12)
    staff = users.create_user(
        username=f"staff-{uuid.uuid4().hex[:6]}", password="x" * 12, is_staff=True
    )

    async def attempt(path: str, headers: list) -> tuple[bool, object]:
        socket = WebsocketCommunicator(application, path, headers=headers)
        connected, code = await socket.connect()
        first = await socket.receive_json_from(timeout=TIMEOUT_S) if connected else code
        await socket.disconnect()
        return connected, first

    def check(user, *, path: str = "", origin: str = "http://localhost"):
        headers = _headers(user, origin)  # the session is made here, outside the event loop
        return async_to_sync(attempt)(path or f"/ws/tasks/{task.chain_task_id}/", headers)

    assert check(stranger) == (False, CLOSE_FORBIDDEN)
    assert check(None) == (False, CLOSE_FORBIDDEN)
    assert check(task.buyer, path="/ws/tasks/999999999/") == (False, CLOSE_FORBIDDEN)
    # Not mirrored yet: the buyer watches the order, pending.
    allowed, own = check(task.buyer)
    assert allowed
    assert (own["snapshot"]["id"], own["snapshot"]["state"]) == (task.chain_task_id, "pending")
    # Another site's page, even in the buyer's browser (with the buyer's cookie), is refused.
    assert check(task.buyer, origin="https://evil.example")[0] is False
    allowed, snapshot = check(staff)
    assert allowed
    assert snapshot["snapshot"]["id"] == task.chain_task_id
