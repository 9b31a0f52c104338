"""What the live push sends per round, through the real sync, ASGI stack and Redis channel
layer: a round's messages carry that round's rows, so their size does not grow with the
rounds before it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.db import connection, transaction
from django.utils.dateparse import parse_datetime

from chain.events import Role
from chain.selection import mask_of
from flexsite.asgi import application
from marketplace import reports, services
from marketplace.sync.push import (
    TaskChange,
    push_on_commit,
    task_group,
    task_push_seq,
    task_watch_mark,
)
from tests.marketplace.test_consumers import TIMEOUT_S, _headers
from tests.marketplace.test_lifecycle import WINDOW_S, advance, bid, enrol, model_id, sync
from tests.marketplace.test_sync import SPEC, mirror_env  # noqa: F401
from tests.postgres import admin_connect, postgres_base

pytestmark = pytest.mark.django_db(transaction=True)

ROUNDS = 10
# A round's messages differ only in the digits of its numbers (round, block, gas, seq).
DIGITS_SLACK_BYTES = 48


def funded_order(*, title: str, spec, trainers: int):
    """A new buyer's task on chain with ``trainers`` trainers, paid from a funded wallet."""
    buyer = services.user_signup(username=f"buyer-{uuid.uuid4().hex[:8]}", password="x" * 12)
    services.wallet_fund(wallet=buyer.wallet)
    return services.task_create(
        buyer=buyer,
        title=title,
        spec=spec,
        min_trainers=trainers,
        max_trainers=trainers,
        round_timeout_s=600,
        dispute_window_s=0,
        budget_wei=10**17,
        bidding_window_s=WINDOW_S,
    )


def test_what_is_pushed_per_round_does_not_grow_with_the_rounds_before(
    platform_market,
    mirror_env,  # noqa: F811
):
    market = platform_market
    order = funded_order(
        title="many rounds", spec=dataclasses.replace(SPEC, rounds=ROUNDS), trainers=2
    )
    aggregator = enrol("aggregator", aggregate=True)
    trainers = [enrol("hal"), enrol("ida")]
    bid(market, aggregator, order, role=Role.AGGREGATOR)
    for trainer in trainers:
        bid(market, trainer, order)
    advance(market, WINDOW_S + 1)
    market.select_nodes(sender=aggregator.account, task_id=order.chain_task_id)
    task_id = order.chain_task_id
    market.publish_global_model(
        sender=aggregator.account, task_id=task_id, round_number=0, model_id=model_id("r0")
    )
    sync()
    by_address = {t.address: t for t in trainers}
    trainer_order = market.selection(task_id=task_id).trainers

    def accuracy(number: int) -> float:
        return 0.25 + number / 32  # short and exact in binary: sizes differ by digits only

    def play_round(number: int) -> None:
        """Trainers send their updates for the round, the aggregator publishes the next
        global model and reports its metrics; sync mirrors it on the way."""
        for address in trainer_order:
            market.submit_update(
                sender=by_address[address].account,
                task_id=task_id,
                round_number=number - 1,
                model_id=model_id(f"u{number}-{address}"),
            )
        global_id = model_id(f"r{number}")
        published = market.publish_global_model(
            sender=aggregator.account,
            task_id=task_id,
            round_number=number,
            model_id=global_id,
            aggregated_mask=mask_of(range(len(trainer_order))),
        )
        sync()
        reports.round_metrics_record(
            task_id=task_id,
            round_number=number,
            model_id=global_id,
            tx_hash=published.tx_hash,
            accuracy=accuracy(number),
            loss=1 - accuracy(number),
            gas_used=published.gas_used,
        )

    headers = _headers(order.buyer)

    async def follow() -> tuple[str, list[list[str]], str]:
        socket = WebsocketCommunicator(application, f"/ws/tasks/{task_id}/", headers=headers)
        connected, _ = await socket.connect(timeout=TIMEOUT_S)
        assert connected
        first = await socket.receive_from(timeout=TIMEOUT_S)
        per_round = []
        for number in range(1, ROUNDS + 1):
            await sync_to_async(play_round)(number)
            # The mirrored round, then its metrics.
            per_round.append([await socket.receive_from(timeout=TIMEOUT_S) for _ in range(2)])
        await socket.send_json_to({"type": "resync"})
        last = await socket.receive_from(timeout=TIMEOUT_S)
        await socket.disconnect()
        return first, per_round, last

    first, per_round, last = async_to_sync(follow)()

    messages = [[json.loads(text) for text in texts] for texts in per_round]
    seqs = [m["seq"] for pair in messages for m in pair]
    assert seqs == list(
        range(json.loads(first)["seq"] + 1, json.loads(first)["seq"] + 1 + 2 * ROUNDS)
    )
    for number, (mirrored, measured) in enumerate(messages, start=1):
        assert (mirrored["type"], measured["type"]) == ("task.delta", "task.delta")
        # Each round's own rows: two updates, its global model, and the round they judged.
        rows = mirrored["snapshot"]
        assert [t["name"] for t in rows["transactions"]] == [
            "UpdateSubmitted",
            "UpdateSubmitted",
            "GlobalModelPublished",
        ]
        assert [r["number"] for r in rows["rounds_published"]] == [number]
        assert {u["round"] for u in rows["updates"]} == {number - 1}
        assert mirrored["view"]["contribution_rounds"] == [number - 1]
        assert [len(c["cells"]) for c in mirrored["view"]["contribution_rows"]] == [1, 1]
        assert measured["snapshot"]["rounds_published"][0]["accuracy"] == accuracy(number)
        assert measured["view"]["latest_accuracy"] == accuracy(number)

    sizes = [sum(len(text.encode()) for text in texts) for texts in per_round]
    # The first round has no earlier one to be compared with, the last ends the training (no
    # round waits any more); in between, the size stays put while the task's history (what a
    # snapshot carries) keeps growing.
    assert max(sizes[1:-1]) - min(sizes[1:-1]) <= DIGITS_SLACK_BYTES, sizes
    assert sizes[-1] <= max(sizes[1:-1]), sizes
    # Pushing the snapshot instead would have grown by far more than the slack each round.
    history_per_round = (len(last.encode()) - len(first.encode())) / ROUNDS
    assert history_per_round > 10 * DIGITS_SLACK_BYTES, (history_per_round, sizes)
    assert json.loads(last)["snapshot"]["published_rounds"] == ROUNDS + 1
    # Trained: the page says from when the task settles (its dispute window is 0 here), from
    # the final round's delta on.
    final_published = json.loads(last)["snapshot"]["rounds_published"][-1]["published_at"]
    settles = parse_datetime(final_published).strftime("%Y-%m-%d %H:%M")
    for message in (*messages[-1], json.loads(last)):
        assert message["view"]["round_note"] == (
            f"all rounds done; settled after {settles} UTC, when the final model's dispute "
            "window closes"
        )


def test_another_platform_on_the_same_redis_does_not_reach_this_ones_pages(monkeypatch):
    """Two platforms share one Redis, each with its own database and chain, whose task ids both
    start at 1: the other's push for its task 1 never reaches a live page of this one's."""
    from django.db import connection

    layer = get_channel_layer()
    ours = task_group(1)
    with monkeypatch.context() as other:
        other.setitem(connection.settings_dict, "NAME", f"other-{uuid.uuid4().hex}")
        theirs = task_group(1)

    async def first_message() -> dict:
        page = await layer.new_channel()
        await layer.group_add(ours, page)
        try:
            await layer.group_send(theirs, {"type": "task.push", "text": "theirs"})
            await layer.group_send(ours, {"type": "task.push", "text": "ours"})
            return await layer.receive(page)
        finally:
            await layer.group_discard(ours, page)

    assert ours != theirs
    assert async_to_sync(first_message)()["text"] == "ours"


def test_a_change_whose_push_finds_its_connection_cut_is_pushed_from_a_new_one(
    platform_market,
    mirror_env,  # noqa: F811
):
    """The database cuts the connection between a change's commit and its push (a restart):
    the change is still pushed, read on a new connection; a page would otherwise never learn
    of it if nothing changes after it (a task's finalization)."""
    if connection.vendor != "postgresql":
        pytest.fail("this test cuts a PostgreSQL connection: run it on PostgreSQL (make test)")
    order = funded_order(title="its last change", spec=SPEC, trainers=1)
    group = task_group(order.chain_task_id)
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(group, channel)
    async_to_sync(task_watch_mark)(group)

    def cut() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            [pid] = cursor.fetchone()
        with admin_connect(postgres_base()) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            # Gone from the server before the push reads: waited for, never timed.
            while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
                time.sleep(0.05)

    with transaction.atomic():
        transaction.on_commit(cut)  # runs first: the push's own callback comes after it
        push_on_commit(changes={order.chain_task_id: TaskChange(whole=True)})

    async def received() -> dict:
        return await asyncio.wait_for(layer.receive(channel), TIMEOUT_S)

    message = async_to_sync(received)()
    assert message["seq"] == task_push_seq(chain_task_id=order.chain_task_id)
