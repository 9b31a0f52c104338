"""The live task page's WebSocket, through the real ASGI stack and Redis channel layer: the
buyer gets the snapshot, then each change as a numbered delta, and a fresh snapshot when it
misses one; nobody else gets anything."""

from __future__ import annotations

import json
import uuid

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.test import Client
from django.urls import reverse

from chain.events import Role
from chain.launcher import free_port
from core.messages import RoundReport
from flexsite.asgi import application
from marketplace import contract
from marketplace.consumers import CLOSE_FORBIDDEN, CLOSE_SESSION_CHANGED
from marketplace.sync.push import task_group, task_push_next, task_push_seq
from marketplace.tasks import reports_record
from tests.marketplace.test_lifecycle import enrol, model_id, post_task, selected_task, sync
from tests.marketplace.test_sync import mirror_env  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)

# Generous: on a busy machine a socket or a sync can take a while; waited for, never timed.
TIMEOUT_S = 120
NEW = "a-new-passphrase-for-the-buyer-7"


def _headers(user=None, origin: str = "http://localhost") -> list[tuple[bytes, bytes]]:
    """A browser on ``origin``; logged in as ``user`` (its session cookie) if given."""
    if user is None:
        return [(b"origin", origin.encode())]
    return _browser(_logged_in(user), origin)


def _browser(client: Client, origin: str = "http://localhost") -> list[tuple[bytes, bytes]]:
    """The headers a socket opened now by ``client``'s browser sends: its session cookie."""
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    return [(b"origin", origin.encode()), (b"cookie", cookie.encode())]


def _logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


async def attempt(task_id: int, headers: list) -> tuple[str, object]:
    """What a socket opened with ``headers`` gets: ("let in", its snapshot), ("closed", the
    code it is closed with before it is sent anything: a browser's page learns a code only
    from a socket that opened) or ("refused", the code of a handshake refused)."""
    socket = WebsocketCommunicator(application, f"/ws/tasks/{task_id}/", headers=headers)
    connected, code = await socket.connect(timeout=TIMEOUT_S)
    if not connected:
        return "refused", code
    first = await socket.receive_output(timeout=TIMEOUT_S)
    await socket.disconnect()
    if first["type"] == "websocket.close":
        return "closed", first["code"]
    return "let in", json.loads(first["text"])


async def closed_with(socket: WebsocketCommunicator) -> int:
    """The code the server closes ``socket`` with (waiting for it)."""
    message = await socket.receive_output(timeout=TIMEOUT_S)
    assert message["type"] == "websocket.close", message
    return message["code"]


async def watch(task_id: int, headers: list) -> tuple[WebsocketCommunicator, dict]:
    """The task's live socket, open, and the snapshot it sent first."""
    socket = WebsocketCommunicator(application, f"/ws/tasks/{task_id}/", headers=headers)
    connected, _ = await socket.connect(timeout=TIMEOUT_S)
    assert connected
    return socket, await socket.receive_json_from(timeout=TIMEOUT_S)


def round_0_report(task, aggregator, published, initial: str) -> RoundReport:
    """The aggregator's signed report of ``task``'s initial model, ``published``."""
    return RoundReport.of(
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


def report_round_0(task, aggregator, published, initial: str) -> None:
    """The aggregator's report of ``task``'s initial model, as the platform's gateway hands
    it on."""
    reports_record(messages=[round_0_report(task, aggregator, published, initial).dump()])


def test_the_buyer_sees_the_snapshot_then_each_change_as_a_delta(platform_market, mirror_env):  # noqa: F811
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
        socket, on_connect = await watch(task.chain_task_id, headers)
        await sync_to_async(sync)()
        mirrored = await socket.receive_json_from(timeout=TIMEOUT_S)
        # What the aggregator reports after publishing, as the gateway hands it on.
        await sync_to_async(report_round_0)(task, aggregator, published, initial)
        measured = await socket.receive_json_from(timeout=TIMEOUT_S)
        await socket.disconnect()
        return on_connect, mirrored, measured

    on_connect, mirrored, measured = async_to_sync(follow)()

    assert on_connect["type"] == "task.snapshot"
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
        "DisputeTermsSet",
        "BidPlaced",
        "BidPlaced",
        "NodesSelected",
    ]
    assert snapshot["budget_wei"] == str(task.budget_wei)

    # The published model comes as the next change: the task as it is now, and only the rows
    # the change wrote.
    assert (mirrored["type"], mirrored["seq"]) == ("task.delta", on_connect["seq"] + 1)
    delta = mirrored["snapshot"]
    assert (delta["state"], delta["published_rounds"], delta["current_round"]) == ("running", 1, 0)
    [round_0] = delta["rounds_published"]
    assert (round_0["number"], round_0["global_model_id"]) == (0, initial)
    assert round_0["tx_hash"] == published.tx_hash
    assert round_0["accuracy"] is None
    assert [t["name"] for t in delta["transactions"]] == ["GlobalModelPublished"]
    assert [r["tx_hash"] for r in mirrored["view"]["tx_rows"]] == [published.tx_hash]
    assert (delta["bids"], delta["selected"], delta["payouts"], delta["updates"]) == (
        [],
        [],
        [],
        [],
    )
    # The page's own scalars still see the whole task: the round waits on dave.
    wait = mirrored["view"]["round_wait"]
    assert (wait["round"], wait["missing"]) == (1, [trainer.address])
    assert mirrored["view"]["trainers_selected"] == 1

    # The aggregator's report, recorded by a worker, is numbered after sync's change.
    assert (measured["type"], measured["seq"]) == ("task.delta", mirrored["seq"] + 1)
    [round_0] = measured["snapshot"]["rounds_published"]
    assert (round_0["accuracy"], round_0["loss"], round_0["gas_used"]) == (
        0.1,
        2.3,
        published.gas_used,
    )
    assert measured["snapshot"]["transactions"] == []


def test_a_page_that_missed_a_change_asks_again_and_gets_a_fresh_snapshot(
    platform_market,
    mirror_env,  # noqa: F811
):
    market = platform_market
    aggregator = enrol("aggregator", aggregate=True)
    trainer = enrol("frank")
    task = selected_task(market, aggregator, [trainer])
    sync()
    headers = _headers(task.buyer)

    def lost_change() -> None:
        """A process numbers a change and commits it, then dies before sending it."""
        with transaction.atomic():
            task_push_next(chain_task_id=task.chain_task_id)

    async def follow() -> tuple[dict, dict, dict]:
        socket, on_connect = await watch(task.chain_task_id, headers)
        await sync_to_async(lost_change)()
        await sync_to_async(market.publish_global_model)(
            sender=aggregator.account,
            task_id=task.chain_task_id,
            round_number=0,
            model_id=model_id("initial"),
        )
        await sync_to_async(sync)()
        after_gap = await socket.receive_json_from(timeout=TIMEOUT_S)
        await socket.send_json_to({"type": "resync"})
        fresh = await socket.receive_json_from(timeout=TIMEOUT_S)
        await socket.disconnect()
        return on_connect, after_gap, fresh

    on_connect, after_gap, fresh = async_to_sync(follow)()
    # The page sees the number jump by two ...
    assert after_gap["seq"] == on_connect["seq"] + 2
    # ... asks again, and gets the whole task as of at least that change.
    assert fresh["type"] == "task.snapshot"
    assert fresh["seq"] == after_gap["seq"]
    assert [r["number"] for r in fresh["snapshot"]["rounds_published"]] == [0]
    assert [t["name"] for t in fresh["snapshot"]["transactions"]][-1] == "GlobalModelPublished"


def test_a_task_nobody_watches_is_numbered_not_pushed_and_a_page_opened_later_follows_on(
    platform_market,
    mirror_env,  # noqa: F811
):
    market = platform_market
    aggregator = enrol("aggregator", aggregate=True)
    trainer = enrol("gina")
    task = selected_task(market, aggregator, [trainer])
    sync()
    group = task_group(task.chain_task_id)
    layer = get_channel_layer()
    initial = model_id("initial")
    headers = _headers(task.buyer)

    async def follow() -> tuple[int, dict, dict, dict]:
        # A listener in the group that is not a page: it hears whatever is sent, and marks
        # nothing watched.
        listener = await layer.new_channel()
        await layer.group_add(group, listener)
        try:
            # Nobody watches: the model's mirror is a numbered change, and nothing is sent.
            published = await sync_to_async(market.publish_global_model)(
                sender=aggregator.account,
                task_id=task.chain_task_id,
                round_number=0,
                model_id=initial,
            )
            await sync_to_async(sync)()
            unwatched = await sync_to_async(task_push_seq)(chain_task_id=task.chain_task_id)
            # A page opens: its snapshot holds that change, and the next change follows on.
            socket, on_connect = await watch(task.chain_task_id, headers)
            await sync_to_async(report_round_0)(task, aggregator, published, initial)
            delta = await socket.receive_json_from(timeout=TIMEOUT_S)
            await socket.disconnect()
            heard = await layer.receive(listener)
        finally:
            await layer.group_discard(group, listener)
        return unwatched, on_connect, delta, heard

    unwatched, on_connect, delta, heard = async_to_sync(follow)()
    assert on_connect["seq"] == unwatched
    assert [r["number"] for r in on_connect["snapshot"]["rounds_published"]] == [0]
    assert (delta["type"], delta["seq"]) == ("task.delta", unwatched + 1)
    # The first message the group ever carried is the watched change: the unwatched one was
    # never built or sent.
    assert heard["seq"] == unwatched + 1


def test_the_socket_names_what_it_does_not_understand(platform_market, mirror_env):  # noqa: F811
    aggregator = enrol("aggregator", aggregate=True)
    task = selected_task(platform_market, aggregator, [enrol("gina")])
    headers = _headers(task.buyer)

    async def talk() -> list[dict]:
        socket, _ = await watch(task.chain_task_id, headers)
        answers = []
        for text in ('{"type": "subscribe", "task": 1}', "not json", "[1, 2]"):
            await socket.send_to(text_data=text)
            answers.append(await socket.receive_json_from(timeout=TIMEOUT_S))
        # Still open and serving: a resync after the bad input is answered.
        await socket.send_json_to({"type": "resync"})
        answers.append(await socket.receive_json_from(timeout=TIMEOUT_S))
        await socket.disconnect()
        return answers

    subscribe, not_json, a_list, resync = async_to_sync(talk)()
    assert (subscribe["type"], subscribe["code"]) == ("task.error", "message_invalid")
    assert "'subscribe'" in subscribe["message"]
    assert "not JSON" in not_json["message"]
    assert "None" in a_list["message"]
    assert (resync["type"], resync["snapshot"]["id"]) == ("task.snapshot", task.chain_task_id)


def test_only_the_buyer_and_staff_may_watch(platform_market, mirror_env):  # noqa: F811
    aggregator = enrol("aggregator", aggregate=True)
    task = selected_task(platform_market, aggregator, [enrol("erin")])
    users = get_user_model().objects
    stranger = users.create_user(username=f"stranger-{uuid.uuid4().hex[:6]}", password="x" * 12)
    staff = users.create_user(
        username=f"staff-{uuid.uuid4().hex[:6]}", password="x" * 12, is_staff=True
    )

    def check(user, *, task_id: int = task.chain_task_id, origin: str = "http://localhost"):
        headers = _headers(user, origin)  # the session is made here, outside the event loop
        return async_to_sync(attempt)(task_id, headers)

    assert check(stranger) == ("closed", CLOSE_FORBIDDEN)
    assert check(None) == ("closed", CLOSE_FORBIDDEN)
    assert check(task.buyer, task_id=999999999) == ("closed", CLOSE_FORBIDDEN)
    # Not mirrored yet: the buyer watches the order, pending.
    allowed, own = check(task.buyer)
    assert allowed == "let in"
    assert (own["snapshot"]["id"], own["snapshot"]["state"]) == (task.chain_task_id, "pending")
    # Another site's page, even in the buyer's browser (with the buyer's cookie), is refused.
    assert check(task.buyer, origin="https://evil.example")[0] == "refused"
    allowed, snapshot = check(staff)
    assert allowed == "let in"
    assert snapshot["snapshot"]["id"] == task.chain_task_id


def test_a_password_change_ends_the_live_pages_of_every_other_session(platform_market):
    """Someone who had the buyer's password (and a page open) must lose the task's live feed
    when the buyer changes it, not only the next page load."""
    task = post_task()
    buyer = task.buyer
    intruder, own = _logged_in(buyer), _logged_in(buyer)
    intruders, owns = _browser(intruder), _browser(own)

    async def change() -> tuple[int, int, object, object]:
        theirs, _ = await watch(task.chain_task_id, intruders)
        mine, _ = await watch(task.chain_task_id, owns)
        changed = await sync_to_async(own.post)(
            reverse("password-change"),
            {"old_password": "x" * 12, "new_password1": NEW, "new_password2": NEW},
        )
        assert changed.status_code == 302
        codes = (await closed_with(theirs), await closed_with(mine))
        # Each page reconnects as it does after any drop: its session decides.
        again = (
            await attempt(task.chain_task_id, intruders),
            await attempt(task.chain_task_id, _browser(own)),  # the cookie the change re-issued
        )
        return (*codes, *again)

    theirs_code, my_code, theirs_again, mine_again = async_to_sync(change)()

    assert (theirs_code, my_code) == (CLOSE_SESSION_CHANGED, CLOSE_SESSION_CHANGED)
    assert theirs_again == ("closed", CLOSE_FORBIDDEN)
    allowed, snapshot = mine_again
    assert allowed == "let in"
    assert snapshot["snapshot"]["id"] == task.chain_task_id


def test_logging_out_or_being_deactivated_ends_the_live_page_and_a_login_elsewhere_does_not(
    platform_market,
):
    task = post_task()
    buyer = task.buyer
    browser = _logged_in(buyer)
    headers = _browser(browser)
    staff = get_user_model().objects.create_user(
        username=f"staff-{uuid.uuid4().hex[:6]}", password="x" * 12, is_staff=True
    )
    staff_headers = _headers(staff)

    async def log_out() -> tuple[dict, int, object, dict]:
        socket, _ = await watch(task.chain_task_id, headers)
        watching, _ = await watch(task.chain_task_id, staff_headers)
        # The buyer logs in on another machine: this page is not disturbed.
        assert await sync_to_async(Client().login)(username=buyer.username, password="x" * 12)
        await socket.send_json_to({"type": "resync"})
        undisturbed = await socket.receive_json_from(timeout=TIMEOUT_S)
        assert (await sync_to_async(browser.post)(reverse("logout"))).status_code == 302
        code = await closed_with(socket)
        again = await attempt(task.chain_task_id, headers)
        # Another account's page goes on.
        await watching.send_json_to({"type": "resync"})
        other = await watching.receive_json_from(timeout=TIMEOUT_S)
        await watching.disconnect()
        return undisturbed, code, again, other

    undisturbed, code, again, other = async_to_sync(log_out)()
    assert undisturbed["type"] == "task.snapshot"
    assert code == CLOSE_SESSION_CHANGED
    assert again == ("closed", CLOSE_FORBIDDEN)
    assert other["snapshot"]["id"] == task.chain_task_id

    # Staff deactivate the account (the admin's "active" box): its open page ends too.
    headers = _headers(buyer)

    async def deactivate() -> tuple[int, object]:
        socket, _ = await watch(task.chain_task_id, headers)
        buyer.is_active = False
        await sync_to_async(buyer.save)()
        return await closed_with(socket), await attempt(task.chain_task_id, headers)

    assert async_to_sync(deactivate)() == (CLOSE_SESSION_CHANGED, ("closed", CLOSE_FORBIDDEN))


def test_with_redis_away_a_log_out_and_a_password_change_still_happen(settings, caplog):
    """Closing the live sockets is told through Redis; without it the account's change stands
    (and is logged), it is not undone or refused."""
    buyer = get_user_model().objects.create_user(
        username=f"buyer-{uuid.uuid4().hex[:6]}", password="x" * 12
    )
    browser = _logged_in(buyer)
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [f"redis://127.0.0.1:{free_port()}/0"]},  # nothing listens
        }
    }

    assert browser.post(reverse("logout")).status_code == 302
    assert browser.get(reverse("task-list")).status_code == 302  # to the login page
    buyer.set_password(NEW)
    buyer.save()

    assert Client().login(username=buyer.username, password=NEW)
    failures = [r for r in caplog.records if "recheck" in r.getMessage()]
    assert len(failures) == 2, [r.getMessage() for r in caplog.records]
