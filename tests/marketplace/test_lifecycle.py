"""Lifecycle triggers on the real Anvil, Redis and database: each fires once, however often
sync, the beat or a redelivered message asks for it again."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import timedelta

import pytest
from celery import Celery
from django.contrib.auth.models import User
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from chain.client import FlexMarket
from chain.events import Role, TaskState
from core.broker import url_with
from core.enrolment import join_message
from core.messages import (
    BidRequest,
    Deployment,
    InitialModelRequest,
    RoundAggregateRequest,
    RoundStep,
    RoundTrainRequest,
    TaskStep,
)
from core.queues import PLATFORM_QUEUE, device_queue
from marketplace import contract, lifecycle, models, reports, services
from marketplace.models import Device, LifecycleAction, Round, Task, TaskOrder, Update
from marketplace.sync import ChainSync
from tests.marketplace.test_sync import SPEC, Broker, mirror_env, register  # noqa: F401
from training.spec import TaskSpec

pytestmark = pytest.mark.django_db(transaction=True)

TRAINER_PRICE = 3 * 10**14
AGGREGATOR_PRICE = 2 * 10**14
BUDGET = 10**16
WINDOW_S = 30
ROUND_TIMEOUT_S = 60
DISPUTE_S = 600
Action = LifecycleAction.Action


@dataclass
class Node:
    device: Device | None
    account: LocalAccount

    @property
    def address(self) -> str:
        return self.account.address

    @property
    def queue(self) -> str:
        return device_queue(self.device.pk)


def enrol(name: str, *, aggregate: bool = False) -> Node:
    """A device enrolled the way `worker join` does it: token, signed challenge, registration."""
    issued = services.join_token_issue(
        label=name, ttl=timedelta(minutes=5), may_aggregate=aggregate
    )
    token = services.join_challenge_issue(raw_token=issued.raw)
    account = Account.create()
    message = encode_defunct(text=join_message(challenge=token.challenge, address=account.address))
    device = services.device_enrol(
        raw_token=issued.raw,
        address=account.address,
        signature=account.sign_message(message).signature.to_0x_hex(),
        name=name,
        device_class="cpu",
        dataplane_url=f"https://{name}.devices.example.org:8443",
        dataplane_cert_sha256=hashlib.sha256(name.encode()).hexdigest(),
    )
    return Node(device=device, account=account)


def post_task(
    *, spec: TaskSpec = SPEC, min_trainers: int = 2, dispute_window_s: int = 0
) -> TaskOrder:
    """A buyer signs up, funds the wallet and posts a task from the website's services; the
    buyer's order is recorded, the task itself is mirrored when chain sync sees it."""
    user = services.user_signup(username=f"buyer-{uuid.uuid4().hex[:8]}", password="x" * 12)
    services.wallet_fund(wallet=user.wallet)
    return services.task_create(
        buyer=user,
        title="digits",
        spec=spec,
        min_trainers=min_trainers,
        max_trainers=2,
        round_timeout_s=ROUND_TIMEOUT_S,
        dispute_window_s=dispute_window_s,
        budget_wei=BUDGET,
        bidding_window_s=WINDOW_S,
    )


def advance(market: FlexMarket, seconds: int, *, mine: bool = True) -> None:
    """Moves chain time on (the session chain's clock only ever moves forward). Without
    ``mine`` the chain sits idle as a dev chain does: no block carries the new time yet."""
    market.w3.provider.make_request("evm_increaseTime", [seconds])
    if mine:
        market.w3.provider.make_request("evm_mine", [])


def mirrored(order: TaskOrder) -> Task:
    """The task chain sync mirrored from the order's transaction."""
    return Task.objects.get(created_tx=order.created_tx)


def bid(market: FlexMarket, node: Node, task, *, role: Role = Role.TRAINER) -> None:
    market.place_bid(
        sender=node.account,
        task_id=task.chain_task_id,
        price_per_round_wei=AGGREGATOR_PRICE if role == Role.AGGREGATOR else TRAINER_PRICE,
        samples=1 if role == Role.AGGREGATOR else 100,
        role=role,
    )


def model_id(label: str) -> str:
    return "0x" + keccak(text=f"model-{label}-{uuid.uuid4().hex}").hex()


def sync() -> None:
    assert ChainSync().run().status == "synced"


def selected_task(
    market: FlexMarket, aggregator: Node, trainers: list[Node], *, dispute_window_s: int = 0
) -> TaskOrder:
    """A posted task whose bidding ended with ``aggregator`` and ``trainers`` selected (not
    mirrored yet: the buyer's order)."""
    task = post_task(min_trainers=len(trainers), dispute_window_s=dispute_window_s)
    bid(market, aggregator, task, role=Role.AGGREGATOR)
    for trainer in trainers:
        bid(market, trainer, task)
    advance(market, WINDOW_S + 1)
    assert lifecycle.task_select_nodes(task_id=task.chain_task_id) is not None
    return task


def test_each_step_of_a_task_fires_once(platform_market, mirror_env: Broker):  # noqa: F811
    market = platform_market
    aggregator = enrol("aggregator", aggregate=True)
    trainers = [enrol("alice"), enrol("bob")]
    revoked = enrol("revoked")
    services.device_revoke(device=revoked.device)

    # TaskCreated -> every eligible device is asked to bid, once.
    task = post_task()
    sync()
    sync()
    task = mirrored(task)
    assert lifecycle.task_notify_devices(task=task) is None
    here = contract.deployment_identity()
    for node in (aggregator, *trainers):
        [(name, message)] = mirror_env.messages(node.queue)
        assert name == "worker.bid"
        assert BidRequest.parse(message) == BidRequest.of(
            here, node=node.address, task_id=task.chain_task_id, spec=SPEC.as_dict()
        )
    assert mirror_env.messages(revoked.queue) == []
    task.refresh_from_db()
    assert task.state == "bidding"

    # Bidding ends by chain time -> the beat queues selection; selection runs once.
    bid(market, aggregator, task, role=Role.AGGREGATOR)
    for trainer in trainers:
        bid(market, trainer, task)
    assert task.chain_task_id not in lifecycle.deadlines_check()["select_nodes"]
    advance(market, WINDOW_S + 1, mine=False)
    assert task.chain_task_id in lifecycle.deadlines_check()["select_nodes"]
    step = TaskStep.of(here, task_id=task.chain_task_id).dump()
    assert ("marketplace.task_select_nodes", step) in mirror_env.messages("platform")
    assert lifecycle.task_select_nodes(task_id=task.chain_task_id) is not None
    assert lifecycle.task_select_nodes(task_id=task.chain_task_id) is None
    assert market.task(task_id=task.chain_task_id).state == TaskState.RUNNING

    # NodesSelected -> the aggregator is asked for the initial model, once.
    sync()
    sync()
    assert lifecycle.task_publish_initial(task=task) is None
    publish = [m for m in mirror_env.messages(aggregator.queue) if m[0] != "worker.bid"]
    assert publish == [
        (
            "worker.publish_initial",
            InitialModelRequest.of(
                here, node=aggregator.address, task_id=task.chain_task_id, spec=SPEC.as_dict()
            ).dump(),
        )
    ]

    # GlobalModelPublished(0) -> the round opens for the trainers and the aggregator, once.
    initial = model_id("initial")
    market.publish_global_model(
        sender=aggregator.account, task_id=task.chain_task_id, round_number=0, model_id=initial
    )
    sync()
    sync()
    task.refresh_from_db()
    assert lifecycle.task_round_start(task=task, round_number=0) is None
    urls = {t.address: t.device.dataplane_url for t in trainers}
    certs = {t.address: t.device.dataplane_cert_sha256 for t in trainers}
    for trainer in trainers:
        assert mirror_env.messages(trainer.queue)[1:] == [
            (
                "worker.train",
                RoundTrainRequest.of(
                    here,
                    node=trainer.address,
                    task_id=task.chain_task_id,
                    round_number=0,
                    spec=SPEC.as_dict(),
                    aggregator_url=aggregator.device.dataplane_url,
                    aggregator_cert_sha256=aggregator.device.dataplane_cert_sha256,
                ).dump(),
            )
        ]
    assert mirror_env.messages(aggregator.queue)[2:] == [
        (
            "worker.aggregate",
            RoundAggregateRequest.of(
                here,
                node=aggregator.address,
                task_id=task.chain_task_id,
                round_number=0,
                spec=SPEC.as_dict(),
                trainer_urls=urls,
                trainer_certs_sha256=certs,
            ).dump(),
        )
    ]

    # The final global model -> finalize is queued; it settles once.
    for trainer in trainers:
        market.submit_update(
            sender=trainer.account,
            task_id=task.chain_task_id,
            round_number=0,
            model_id=model_id(trainer.address),
        )
    final = model_id("final")
    published = market.publish_global_model(
        sender=aggregator.account,
        task_id=task.chain_task_id,
        round_number=1,
        model_id=final,
        aggregated_mask=0b11,
    )
    sync()
    finalize = ("marketplace.task_finalize", TaskStep.of(here, task_id=task.chain_task_id).dump())
    assert mirror_env.messages("platform").count(finalize) == 1
    # ... and its trainers are sent it to check, and the platform checks it for the buyer.
    check = ("marketplace.model_check", TaskStep.of(here, task_id=task.chain_task_id).dump())
    assert mirror_env.messages("platform").count(check) == 1
    for trainer in trainers:
        [(name, message)] = mirror_env.messages(trainer.queue)[2:]
        assert (name, RoundTrainRequest.parse(message).round_number) == ("worker.train", 1)
    sync()
    assert mirror_env.messages("platform").count(finalize) == 1
    task.refresh_from_db()
    assert task.state == "trained"
    assert lifecycle.task_finalize(task_id=task.chain_task_id) is not None
    assert lifecycle.task_finalize(task_id=task.chain_task_id) is None
    sync()
    task.refresh_from_db()
    assert task.state == "finalized"
    # Unscored, each valid update earns half its price; stakes and the bond come back.
    paid = {
        p.account: p.amount_wei for p in task.payouts.filter(reason__in=["trainer", "aggregator"])
    }
    assert paid == {
        trainers[0].address: TRAINER_PRICE // 2,
        trainers[1].address: TRAINER_PRICE // 2,
        aggregator.address: AGGREGATOR_PRICE,
    }
    assert task.refunded_wei == BUDGET - TRAINER_PRICE - AGGREGATOR_PRICE
    deposits = {b.device: b.deposit_wei for b in task.bids.all()}
    returned = {p.account: p.amount_wei for p in task.payouts.filter(reason="stake")}
    assert returned == deposits
    assert task.slashed_wei == 0

    # What the aggregator reports is the Round's, if it names the chain's model.
    reports.round_metrics_record(
        task_id=task.chain_task_id,
        round_number=1,
        model_id=final,
        tx_hash=published.tx_hash,
        accuracy=0.9,
        loss=0.3,
        gas_used=published.gas_used,
    )
    forged = reports.round_metrics_record(
        task_id=task.chain_task_id,
        round_number=1,
        model_id=initial,
        tx_hash=published.tx_hash,
        accuracy=0.1,
    )
    assert forged is None
    row = Round.objects.get(task=task, number=1)
    assert (
        row.metrics.accuracy,
        row.metrics.loss,
        row.metrics.gas_used,
        row.updates_aggregated,
    ) == (
        0.9,
        0.3,
        published.gas_used,
        2,
    )
    with pytest.raises(reports.RoundNotMirroredError):
        reports.round_metrics_record(
            task_id=task.chain_task_id, round_number=2, model_id=final, tx_hash=published.tx_hash
        )

    # What a trainer reports of its own update is the Update's, if it names the chain's.
    submitted = Update.objects.get(task=task, round_number=0, trainer=trainers[0].address)
    reports.update_metrics_record(
        task_id=task.chain_task_id,
        round_number=0,
        trainer=trainers[0].address,
        model_id=submitted.model_id,
        tx_hash=submitted.tx_hash,
        num_examples=120,
        loss=0.5,
        accuracy=0.8,
        train_s=0.25,
    )
    forged_update = reports.update_metrics_record(
        task_id=task.chain_task_id,
        round_number=0,
        trainer=trainers[0].address,
        model_id=final,
        tx_hash=submitted.tx_hash,
        train_s=99.0,
    )
    assert forged_update is None
    report = Update.objects.get(pk=submitted.pk).metrics
    assert (report.num_examples, report.loss, report.accuracy, report.train_s) == (
        120,
        0.5,
        0.8,
        0.25,
    )
    with pytest.raises(reports.UpdateNotMirroredError):
        reports.update_metrics_record(
            task_id=task.chain_task_id,
            round_number=1,
            trainer=trainers[0].address,
            model_id=final,
            tx_hash=published.tx_hash,
        )

    fired = sorted(LifecycleAction.objects.filter(task=task).values_list("action", "round_number"))
    assert fired == sorted(
        [
            (Action.NOTIFY_BIDS, 0),
            (Action.SELECT_NODES, 0),
            (Action.PUBLISH_INITIAL, 0),
            (Action.START_ROUND, 0),
            (Action.START_ROUND, 1),  # the final model: the trainers only check it
            (Action.FINALIZE, 0),
        ]
    )


def test_the_beats_look_costs_no_more_queries_for_more_tasks_waiting(
    platform_market,
    mirror_env: Broker,  # noqa: F811
):
    enrol("bidder")  # a device to ask for bids

    def look_queries() -> int:
        """The queries of a look at this test's tasks alone. The chain is shared with earlier
        tests, whose tasks sync mirrors here too (with no orders): each look asks again to
        notify some and sends steps for others, and one falling due between two looks by
        chain time changes what a look costs. The database is flushed after this test."""
        mine = [o.created_tx for o in orders]
        Task.objects.exclude(created_tx__in=mine).update(state=models.TaskState.CANCELLED)
        lifecycle.deadlines_check()  # sends what is due, so the next look finds nothing
        with CaptureQueriesContext(connection) as look:
            lifecycle.deadlines_check()
        return len(look)

    orders = [post_task()]
    sync()
    one = look_queries()
    orders += [post_task(), post_task()]
    sync()
    assert look_queries() == one
    # Each was asked for bids once, all the same.
    notified = LifecycleAction.objects.filter(action=LifecycleAction.Action.NOTIFY_BIDS)
    assert sorted(notified.values_list("task__created_tx", flat=True)) == sorted(
        o.created_tx for o in orders
    )


def round_0_submitted(market: FlexMarket, *, dispute_window_s: int = 0) -> tuple[Node, TaskOrder]:
    """An aggregator and one trainer selected for a task, the initial model published and
    mirrored, and the trainer's update for round 0 submitted: the aggregator's turn."""
    aggregator, trainer = enrol("aggregator", aggregate=True), enrol("trainer")
    order = selected_task(market, aggregator, [trainer], dispute_window_s=dispute_window_s)
    task_id = order.chain_task_id
    market.publish_global_model(
        sender=aggregator.account, task_id=task_id, round_number=0, model_id=model_id("initial")
    )
    sync()
    market.submit_update(
        sender=trainer.account, task_id=task_id, round_number=0, model_id=model_id("update")
    )
    return aggregator, order


def test_a_task_whose_aggregator_stops_after_a_round_is_aborted_at_the_deadline(
    platform_market,
    mirror_env: Broker,  # noqa: F811
):
    market = platform_market
    _, order = round_0_submitted(market)
    task_id = order.chain_task_id
    # The next global model is due two round timeouts after the last (one to train, one to
    # aggregate); the aggregator never publishes it.
    assert task_id not in lifecycle.deadlines_check()["abort"]
    assert lifecycle.task_abort(task_id=task_id) is None
    advance(market, 2 * ROUND_TIMEOUT_S + 1, mine=False)
    assert task_id in lifecycle.deadlines_check()["abort"]
    assert lifecycle.task_abort(task_id=task_id) is not None
    sync()
    assert mirrored(order).state == "aborted"
    assert task_id not in lifecycle.deadlines_check()["abort"]


def test_a_mirror_that_lags_never_aborts_an_aggregator_that_was_in_time(
    platform_market,
    mirror_env: Broker,  # noqa: F811
):
    market = platform_market
    aggregator, order = round_0_submitted(market)
    task_id = order.chain_task_id
    # The final model comes in time, and chain sync has not seen it yet when the mirrored
    # round 0 says the next one is overdue: the chain has the last word, and nobody's bond
    # is slashed for the mirror's lag.
    advance(market, 2 * ROUND_TIMEOUT_S - 60)
    market.publish_global_model(
        sender=aggregator.account,
        task_id=task_id,
        round_number=1,
        model_id=model_id("final"),
        aggregated_mask=0b1,
    )
    advance(market, 61, mine=False)
    assert mirrored(order).state == "running"
    assert task_id not in lifecycle.deadlines_check()["abort"]
    assert lifecycle.task_abort(task_id=task_id) is None
    sync()
    assert mirrored(order).state == "trained"


def test_a_trained_task_is_finalized_once_its_dispute_window_closes(
    platform_market,
    mirror_env: Broker,  # noqa: F811
):
    market = platform_market
    aggregator, order = round_0_submitted(market, dispute_window_s=DISPUTE_S)
    task_id = order.chain_task_id
    market.publish_global_model(
        sender=aggregator.account,
        task_id=task_id,
        round_number=1,
        model_id=model_id("final"),
        aggregated_mask=0b1,
    )
    sync()
    assert mirrored(order).state == "trained"

    # While the final model may be challenged, the beat queues no finalization for it, tick
    # after tick, and none would settle it.
    for _ in range(2):
        assert task_id not in lifecycle.deadlines_check()["finalize"]
    assert lifecycle.task_finalize(task_id=task_id) is None

    # Once the window has closed by chain time (no block need carry it yet), it is queued
    # and settles.
    advance(market, DISPUTE_S + 1, mine=False)
    assert task_id in lifecycle.deadlines_check()["finalize"]
    assert lifecycle.task_finalize(task_id=task_id) is not None
    sync()
    assert mirrored(order).state == "finalized"
    assert task_id not in lifecycle.deadlines_check()["finalize"]


def test_missed_deadline_aborts_once_and_a_node_without_a_device_is_only_logged(
    platform_market,
    mirror_env: Broker,  # noqa: F811
    caplog,
):
    market = platform_market
    # An aggregator registered on chain by hand: no enrolled Device row, so no queue.
    stranger = Account.from_key(keccak(text=f"stranger-{uuid.uuid4().hex}"))
    market.w3.provider.make_request("anvil_setBalance", [stranger.address, hex(10**20)])
    register(market, stranger, aggregate=True)
    trainer = enrol("carol")
    task = selected_task(market, Node(device=None, account=stranger), [trainer])

    with caplog.at_level("WARNING", logger="marketplace.lifecycle"):
        sync()
    task = mirrored(task)
    assert "is not an enrolled device" in caplog.text
    action = LifecycleAction.objects.get(task=task, action=Action.PUBLISH_INITIAL)
    assert action.detail == {"missing": [stranger.address]}
    assert mirror_env.messages(trainer.queue) == []  # bidding was over when sync saw it

    # Nobody publishes the initial model: after the deadline (chain time) the task aborts.
    # The beat counts it from the selection's time, as mirrored.
    info = market.task(task_id=task.chain_task_id)
    assert task.selected_at.timestamp() + ROUND_TIMEOUT_S == info.publish_deadline
    assert task.chain_task_id not in lifecycle.deadlines_check()["abort"]
    assert lifecycle.task_abort(task_id=task.chain_task_id) is None
    advance(market, ROUND_TIMEOUT_S + 1, mine=False)
    assert task.chain_task_id in lifecycle.deadlines_check()["abort"]
    assert lifecycle.task_abort(task_id=task.chain_task_id) is not None
    assert lifecycle.task_abort(task_id=task.chain_task_id) is None
    sync()
    task.refresh_from_db()
    assert task.state == "aborted"
    assert task.refunded_wei == BUDGET
    assert LifecycleAction.objects.filter(task=task, action=Action.ABORT).count() == 1


def test_a_later_round_is_reminded_only_to_the_nodes_that_did_not_start_it(
    platform_market,
    mirror_env: Broker,  # noqa: F811
):
    """Nodes start a round after the first on their own as its global model lands (worker
    .follow): the platform tells nobody at once, and FLEX_ROUND_REMIND_S later tells only a
    trainer whose update is not in and the aggregator, and only while the round is open."""
    market = platform_market
    here = contract.deployment_identity()
    aggregator = enrol("round-aggregator", aggregate=True)
    trainers = [enrol("round-ann"), enrol("round-ben")]
    three_rounds = TaskSpec.from_dict({**SPEC.as_dict(), "rounds": 3})
    order = post_task(spec=three_rounds)
    bid(market, aggregator, order, role=Role.AGGREGATOR)
    for trainer in trainers:
        bid(market, trainer, order)
    advance(market, WINDOW_S + 1)
    assert lifecycle.task_select_nodes(task_id=order.chain_task_id) is not None
    sync()
    task_id = order.chain_task_id

    def publish(round_number: int, mask: int = 0) -> None:
        market.publish_global_model(
            sender=aggregator.account,
            task_id=task_id,
            round_number=round_number,
            model_id=model_id(f"global-{round_number}"),
            aggregated_mask=mask,
        )
        sync()

    def submit(trainer: Node, round_number: int) -> None:
        market.submit_update(
            sender=trainer.account,
            task_id=task_id,
            round_number=round_number,
            model_id=model_id(f"{trainer.address}-{round_number}"),
        )
        sync()

    def told(node: Node, round_number: int) -> list[str]:
        return [
            name
            for name, message, _ in mirror_env.waiting(node.queue)
            if name in ("worker.train", "worker.aggregate")
            and message["round_number"] == round_number
        ]

    # Round 0 tells every node at once: it is how a node learns the task it then follows.
    publish(0)
    assert [told(t, 0) for t in trainers] == [["worker.train"], ["worker.train"]]
    assert told(aggregator, 0) == ["worker.aggregate"]
    for trainer in trainers:
        submit(trainer, 0)
    publish(1, mask=0b11)

    # Round 1: no node is told now; a reminder waits on the platform's queue.
    assert [told(n, 1) for n in (*trainers, aggregator)] == [[], [], []]
    reminders = [m for m in mirror_env.waiting("platform") if m[0] == "marketplace.round_remind"]
    assert [
        (RoundStep.parse(m).task_id, RoundStep.parse(m).round_number) for _, m, _ in reminders
    ] == [(task_id, 1)]
    assert reminders[0][2] is not None  # to run later, not now
    assert RoundStep.parse(reminders[0][1]).is_for(here)

    # Ann started on her own and her update is in; Ben's follower missed the round.
    submit(trainers[0], 1)
    reminded = lifecycle.task_round_remind(task_id=task_id, round_number=1)
    assert reminded == [trainers[1].address, aggregator.address]
    assert told(trainers[0], 1) == []
    assert told(trainers[1], 1) == ["worker.train"]
    [(_, aggregate, _)] = [
        m
        for m in mirror_env.waiting(aggregator.queue)
        if m[0] == "worker.aggregate" and m[1]["round_number"] == 1
    ]
    assert RoundAggregateRequest.parse(aggregate).trainer_urls == {
        t.address: t.device.dataplane_url for t in trainers
    }

    # Once the round's global model is out, a late reminder tells nobody.
    submit(trainers[1], 1)
    publish(2, mask=0b11)
    before = {n.address: mirror_env.waiting(n.queue) for n in (*trainers, aggregator)}
    assert lifecycle.task_round_remind(task_id=task_id, round_number=1) is None
    assert {n.address: mirror_env.waiting(n.queue) for n in (*trainers, aggregator)} == before


def test_a_step_the_broker_refuses_is_logged_and_the_commit_stands(broker, monkeypatch, caplog):
    """A step is sent once its transaction commits; when the broker refuses it then, the
    failure is logged and what the transaction wrote stays (the beat's next look or a
    reminder sends the step again)."""
    refusing = Celery(
        "flex-refused",
        broker=url_with(broker.url, vhost="flex-no-such-vhost"),
        set_as_current=False,
    )
    monkeypatch.setattr(lifecycle, "celery_app", refusing)
    step = TaskStep.of(Deployment(chain_id=1, contract="0x" + "11" * 20), task_id=1)
    with transaction.atomic():
        User.objects.create_user(username="kept")
        lifecycle.dispatch("marketplace.task_abort", queue=PLATFORM_QUEUE, message=step)

    assert User.objects.filter(username="kept").exists()
    [failed] = [r for r in caplog.records if "in on_commit()" in r.getMessage()]
    assert "dispatch.<locals>.send_step" in failed.getMessage()
    assert failed.exc_info is not None
