"""Devices enrolled with join tokens run as real Celery workers on the real RabbitMQ, each
with its own broker user: they bid, train and aggregate a task against a real Anvil, report
signed measurements, every model ID on chain verifies, and bad messages are refused."""

from __future__ import annotations

import json

import pytest

from chain.events import CreditReason, PaymentCredited, Role, TaskCreated, TaskState
from chain.launcher import dev_accounts
from chain.selection import positions_of
from core.messages import (
    BidRequest,
    Deployment,
    InitialModelRequest,
    RoundAggregateRequest,
    RoundTrainRequest,
)
from core.queues import device_queue, route
from dataplane.client import fetch_model
from marketplace.models import Device
from tests.worker.conftest import (
    AGGREGATOR_PRICE,
    TRAINER_PRICE,
    finished,
    wait_for,
    worker_cli,
)
from training import serialize
from training.spec import TaskSpec
from training.store import ModelStore

pytestmark = pytest.mark.django_db(transaction=True)

SPEC = TaskSpec.from_dict(
    {"model": "digits-mlp", "dataset": "digits-8x8", "rounds": 2, "local_epochs": 2, "seed": 7}
)


def _stored_id(store: ModelStore, model_id: str) -> str:
    return serialize.id_hex(serialize.model_id(store.get(model_id)))


def _task(market, *, buyer_index: int, min_trainers: int) -> int:
    now = market.w3.eth.get_block("pending")["timestamp"]
    created = market.create_task(
        sender=dev_accounts(1, start=buyer_index)[0],
        spec_hash=SPEC.hash,
        rounds=SPEC.rounds,
        min_trainers=min_trainers,
        max_trainers=2,
        bidding_ends=now + 3600,
        round_timeout=600,
        budget_wei=10**16,
    )
    return created.first(TaskCreated).task_id


def test_enrolled_devices_bid_train_and_aggregate_through_the_broker(
    nodes, platform, platform_market
):
    market, w3 = platform_market, platform_market.w3
    platform_account = dev_accounts(1)[0]
    buyer = dev_accounts(1, start=5)[0]
    aggregator, trainers = nodes["aggregator"], [nodes["alice"], nodes["bob"]]
    task_id = _task(market, buyer_index=5, min_trainers=2)
    spec = SPEC.as_dict()
    # Each node loaded its data and TensorFlow before it took work, not inside a bidding window.
    for n in nodes.values():
        log = wait_for(lambda n=n: "ready." in (text := n.log.read_text()) and text)
        assert log.index("ready to bid") < log.index("ready.")
    for trainer in trainers:
        assert "samples of digits-8x8" in trainer.log.read_text()

    for n in nodes.values():
        platform.send("worker.bid", BidRequest, n, task_id=task_id, spec=spec)
    on_chain = wait_for(lambda: len(b := market.bids(task_id=task_id)) == 3 and b)

    by_device = {b.device: b for b in on_chain}
    assert by_device[aggregator.config.address].role == Role.AGGREGATOR
    for trainer in trainers:
        bid = by_device[trainer.config.address]
        assert bid.role == Role.TRAINER
        assert bid.price_per_round_wei == TRAINER_PRICE
        assert bid.samples > 0

    # A second delivery of the same notification places nothing new.
    again = platform.send("worker.bid", BidRequest, trainers[0], task_id=task_id, spec=spec)
    assert "succeeded" in finished(trainers[0], again)
    assert len(market.bids(task_id=task_id)) == 3

    w3.provider.make_request("evm_increaseTime", [3601])
    w3.provider.make_request("evm_mine", [])
    market.select_nodes(sender=platform_account, task_id=task_id)
    # A notice that arrives after bidding closed is an info line, not a failure.
    closed = platform.send("worker.bid", BidRequest, trainers[1], task_id=task_id, spec=spec)
    assert finished(trainers[1], closed).endswith("None")
    assert f"task {task_id}: bidding is closed" in trainers[1].log.read_text()
    selection = market.selection(task_id=task_id)
    assert selection.aggregator == aggregator.config.address
    assert set(selection.trainers) == {t.config.address for t in trainers}

    platform.send(
        "worker.publish_initial", InitialModelRequest, aggregator, task_id=task_id, spec=spec
    )
    [initial] = platform.reports(1)
    assert (initial.kind, initial.device, initial.round_number) == (
        "round",
        aggregator.config.address,
        0,
    )
    assert initial.model_id == market.global_model(task_id=task_id, round_number=0)
    # What the platform's lifecycle sends: each peer's URL and certificate as registered.
    devices = {d.address: d for d in Device.objects.all()}
    urls = {t.config.address: devices[t.config.address].dataplane_url for t in trainers}
    certs = {t.config.address: devices[t.config.address].dataplane_cert_sha256 for t in trainers}
    aggregator_cert = devices[aggregator.config.address].dataplane_cert_sha256
    accuracy = []
    arrived: list = []

    def round_reports(round_number: int) -> tuple[dict, object]:
        """The trainers' update reports of the round and the aggregator's report of the
        model it made of them, whatever reports of the next round came in between."""

        def of_round(r) -> bool:
            return r.round_number == (round_number if r.kind == "update" else round_number + 1)

        while len([r for r in arrived if of_round(r)]) < 3:
            arrived.extend(platform.reports(1))
        mine = [r for r in arrived if of_round(r)]
        arrived[:] = [r for r in arrived if not of_round(r)]
        [published] = [r for r in mine if r.kind == "round"]
        return {r.device: r for r in mine if r.kind == "update"}, published

    for round_number in range(SPEC.rounds):
        # The platform opens the first round with its messages. Later rounds get none here:
        # each node follows the chain itself, the trainers starting as soon as the global
        # model is published and the aggregator aggregating as soon as the last update is in.
        if round_number == 0:
            common = {"task_id": task_id, "round_number": round_number, "spec": spec}
            platform.send(
                "worker.aggregate",
                RoundAggregateRequest,
                aggregator,
                trainer_urls=urls,
                trainer_certs_sha256=certs,
                **common,
            )
            for t in trainers:
                platform.send(
                    "worker.train",
                    RoundTrainRequest,
                    t,
                    aggregator_url=aggregator.config.dataplane_url,
                    aggregator_cert_sha256=aggregator_cert,
                    **common,
                )
        updates, published = round_reports(round_number)
        for trainer in trainers:
            report = updates[trainer.config.address]
            on_chain_id = market.update_of(
                task_id=task_id, round_number=round_number, trainer=trainer.config.address
            )
            assert report.model_id == on_chain_id
            assert report.num_examples > 0
            assert _stored_id(trainer.store, on_chain_id) == on_chain_id
            # The trainer checked the global model it fetched against the chain, and kept it.
            global_id = market.global_model(task_id=task_id, round_number=round_number)
            assert _stored_id(trainer.store, global_id) == global_id
        assert published.device == aggregator.config.address
        assert published.round_number == round_number + 1
        assert published.updates == 2
        info = market.round_info(task_id=task_id, round_number=round_number)
        assert positions_of(info.aggregated_mask) == [0, 1]
        next_id = market.global_model(task_id=task_id, round_number=round_number + 1)
        assert published.model_id == next_id
        assert _stored_id(aggregator.store, next_id) == next_id
        accuracy.append(published.accuracy)

    assert accuracy[-1] > 0.5
    assert market.task(task_id=task_id).state == TaskState.TRAINED
    # Each worker looked after its store at start, keeping everything of a running task.
    for node in [*trainers, aggregator]:
        assert "model stores looked after" in node.log.read_text()
    # Trained but not settled: a prune, however short the keep, takes nothing.
    assert _prune(trainers[0], "--keep-days", "0") == [
        "nothing to delete: no task settled with models kept 0 day(s)"
    ]
    # Round 1 had no message: the nodes handed it on themselves from the chain's events.
    for trainer in trainers:
        assert f"task {task_id}: round 1 handed on to worker.train" in trainer.log.read_text()
    assert f"task {task_id}: round 1 handed on to worker.aggregate" in aggregator.log.read_text()

    # Redelivered work after the fact changes nothing on chain and reports nothing.
    late = platform.send(
        "worker.train",
        RoundTrainRequest,
        trainers[0],
        task_id=task_id,
        round_number=1,
        spec=spec,
        aggregator_url=aggregator.config.dataplane_url,
        aggregator_cert_sha256=aggregator_cert,
    )
    assert finished(trainers[0], late).endswith("None")

    # The buyer fetches the final model from the aggregator's data plane and checks its ID.
    final_id = market.global_model(task_id=task_id, round_number=SPEC.rounds)

    def download() -> bytes:
        return fetch_model(
            base_url=aggregator.config.dataplane_url,
            cert_sha256=aggregator_cert,
            model_id=final_id,
            server_address=aggregator.config.address,
            account=buyer,
        )

    blob = download()
    final = serialize.decode(blob, expected_id=final_id)
    assert len(final.values) == 4
    assert (final.header.kind, final.header.task_id, final.header.round_number) == (
        serialize.Kind.GLOBAL,
        task_id,
        SPEC.rounds,
    )
    assert final.header.contract == market.address

    settled = market.finalize(sender=platform_account, task_id=task_id)
    pay = {(e.account, e.reason): e.amount_wei for e in settled.all(PaymentCredited)}
    # Each round's pool, half the two trainers' prices, is shared by score, none above its price.
    earned = [pay.get((t.config.address, CreditReason.TRAINER_PAY), 0) for t in trainers]
    assert TRAINER_PRICE * SPEC.rounds - 2 * SPEC.rounds <= sum(earned)
    assert sum(earned) <= TRAINER_PRICE * SPEC.rounds
    assert all(e <= TRAINER_PRICE * SPEC.rounds for e in earned)
    assert pay[(aggregator.config.address, CreditReason.AGGREGATOR_PAY)] == (
        AGGREGATOR_PRICE * SPEC.rounds
    )
    info = market.task(task_id=task_id)
    for t in trainers:
        assert pay[(t.config.address, CreditReason.STAKE_RETURNED)] == info.trainer_stake_wei
    assert pay[(aggregator.config.address, CreditReason.STAKE_RETURNED)] == (
        info.aggregator_bond_wei
    )

    # Settled, the task's models may go: each trainer deletes all of them, the aggregator all
    # but the final model, which the buyer still downloads from it.
    for node in [*trainers, aggregator]:
        held = node.store.list(task_id=task_id)
        assert len(held) >= SPEC.rounds
        kept = 1 if node is aggregator else 0
        if node is trainers[0]:
            said = json.loads(worker_cli("prune", "--home", str(node.home), "--json").stdout)
            assert said == {"keep_days": 30, "pruned": []}  # all of it newer than that
            done = worker_cli("prune", "--home", str(node.home), "--keep-days=0", "--json")
            assert json.loads(done.stdout)["pruned"] == [
                {
                    "task_id": task_id,
                    "state": "finalized",
                    "models": len(held),
                    "freed_bytes": sum(m.size for m in held),
                }
            ]
        else:
            pruned = _prune(node, "--keep-days", "0")
            assert pruned == [f"task {task_id} (finalized): deleted {len(held) - kept} model(s),"]
        assert len(node.store.list(task_id=task_id)) == kept
        assert _prune(node) == ["nothing to delete: no task settled with models kept 30 day(s)"]
    assert [m.id_hex for m in aggregator.store.list(task_id=task_id)] == [final_id]
    assert download() == blob


def _prune(node, *args: str) -> list[str]:
    """What `python -m worker prune` says for ``node``, without the byte counts."""
    done = worker_cli("prune", "--home", str(node.home), *args)
    return [
        line.rsplit(" ", 2)[0] if "bytes" in line else line for line in done.stdout.splitlines()
    ]


def test_bad_messages_are_refused_and_the_device_keeps_serving(nodes, platform, platform_market):
    market = platform_market
    alice = nodes["alice"]
    task_id = _task(market, buyer_index=6, min_trainers=1)
    spec = SPEC.as_dict()
    tampered = {**spec, "learning_rate": 5.0}
    elsewhere = Deployment(chain_id=platform.deployment.chain_id, contract="0x" + "11" * 20)

    malformed = platform.send_raw("worker.bid", alice, {"task_id": "one", "spec": []})
    a_string = platform.client.send_task(
        "worker.bid", args=["no message"], **route(device_queue(alice.config.device_id))
    ).id
    foreign = platform.send_raw(
        "worker.bid",
        alice,
        BidRequest.of(elsewhere, node=alice.config.address, task_id=task_id, spec=spec).dump(),
    )
    mismatch = platform.send("worker.bid", BidRequest, alice, task_id=task_id, spec=tampered)
    someone_else = platform.send_raw(
        "worker.bid",
        alice,
        BidRequest.of(
            platform.deployment, node=nodes["bob"].config.address, task_id=task_id, spec=spec
        ).dump(),
    )

    # Each is refused by its name, without a traceback or a retry; nothing reaches the chain.
    assert "raised expected: MessageInvalidError" in finished(alice, malformed)
    assert "raised expected: MessageInvalidError" in finished(alice, a_string)
    assert finished(alice, foreign).endswith("None")
    assert "raised expected: SpecMismatchError" in finished(alice, mismatch)
    assert "raised expected: UnknownNodeError" in finished(alice, someone_else)
    assert "dropped a BidRequest message for chain" in alice.log.read_text()
    assert "Retry in" not in alice.log.read_text()
    assert market.bids(task_id=task_id) == []

    # The worker still serves good work.
    platform.send("worker.bid", BidRequest, alice, task_id=task_id, spec=spec)
    [bid] = wait_for(lambda: market.bids(task_id=task_id))
    assert bid.device == alice.config.address
