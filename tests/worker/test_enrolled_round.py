"""Devices enrolled with join tokens run as real Celery workers on the real Redis: they bid,
train and aggregate a task against a real Anvil, and every model ID on chain verifies."""

from __future__ import annotations

import pytest

from chain.events import Role, TaskCreated, TaskState
from chain.launcher import dev_accounts
from chain.selection import positions_of
from dataplane.client import fetch_model
from tests.worker.conftest import AGGREGATOR_PRICE, RESULT_TIMEOUT, TRAINER_PRICE, send
from training import serialize
from training.spec import TaskSpec
from training.store import ModelStore
from worker.trainer import SpecMismatchError

pytestmark = pytest.mark.django_db(transaction=True)

SPEC = TaskSpec.from_dict(
    {"model": "digits-mlp", "dataset": "digits-8x8", "rounds": 2, "local_epochs": 2, "seed": 7}
)


def _stored_id(store: ModelStore, model_id: str) -> str:
    return serialize.id_hex(serialize.model_id(store.get(model_id)))


def test_enrolled_devices_bid_train_and_aggregate_through_celery(nodes, broker, platform_market):
    market, w3 = platform_market, platform_market.w3
    platform, buyer = dev_accounts(1)[0], dev_accounts(1, start=5)[0]
    aggregator, trainers = nodes["aggregator"], [nodes["alice"], nodes["bob"]]
    now = w3.eth.get_block("pending")["timestamp"]
    budget = 10**16
    created = market.create_task(
        sender=buyer,
        spec_hash=SPEC.hash,
        rounds=SPEC.rounds,
        min_trainers=2,
        max_trainers=2,
        bidding_ends=now + 3600,
        round_timeout=600,
        budget_wei=budget,
    )
    task_id = created.first(TaskCreated).task_id
    spec = SPEC.as_dict()

    bids = [send(broker, "worker.place_bid", n, task_id=task_id, spec=spec) for n in nodes.values()]
    decisions = [b.get(timeout=RESULT_TIMEOUT) for b in bids]

    assert decisions[0]["role"] == "aggregator"
    assert [d["role"] for d in decisions[1:]] == ["trainer", "trainer"]
    on_chain = {b.device: b for b in market.bids(task_id=task_id)}
    assert on_chain[aggregator.config.address].role == Role.AGGREGATOR
    for trainer, decision in zip(trainers, decisions[1:], strict=True):
        bid = on_chain[trainer.config.address]
        assert bid.price_per_round_wei == TRAINER_PRICE
        assert bid.samples == decision["samples"] > 0

    # A second delivery of the same notification places nothing new.
    again = send(broker, "worker.place_bid", trainers[0], task_id=task_id, spec=spec)
    assert again.get(timeout=RESULT_TIMEOUT)["samples"] == decisions[1]["samples"]
    assert len(market.bids(task_id=task_id)) == 3

    w3.provider.make_request("evm_increaseTime", [3601])
    w3.provider.make_request("evm_mine", [])
    market.select_nodes(sender=platform, task_id=task_id)
    selection = market.selection(task_id=task_id)
    assert selection.aggregator == aggregator.config.address
    assert set(selection.trainers) == {t.config.address for t in trainers}

    initial = send(broker, "worker.publish_initial_model", aggregator, task_id=task_id, spec=spec)
    assert initial.get(timeout=RESULT_TIMEOUT)["round"] == 0
    urls = {t.config.address: t.config.dataplane_url for t in trainers}
    accuracy = []
    for round_number in range(SPEC.rounds):
        aggregated = send(
            broker,
            "worker.aggregate_round",
            aggregator,
            task_id=task_id,
            round_number=round_number,
            spec=spec,
            trainer_urls=urls,
        )
        trained = [
            send(
                broker,
                "worker.train_round",
                t,
                task_id=task_id,
                round_number=round_number,
                spec=spec,
                aggregator_url=aggregator.config.dataplane_url,
            )
            for t in trainers
        ]
        for trainer, result in zip(trainers, trained, strict=True):
            update_id = result.get(timeout=RESULT_TIMEOUT)["update_id"]
            on_chain_id = market.update_of(
                task_id=task_id, round_number=round_number, trainer=trainer.config.address
            )
            assert update_id == on_chain_id
            assert _stored_id(trainer.store, on_chain_id) == on_chain_id
            # The trainer checked the global model it fetched against the chain, and kept it.
            global_id = market.global_model(task_id=task_id, round_number=round_number)
            assert _stored_id(trainer.store, global_id) == global_id
        summary = aggregated.get(timeout=RESULT_TIMEOUT)
        assert summary["round"] == round_number + 1
        assert summary["updates"] == 2
        assert summary["rejected"] == {}
        info = market.round_info(task_id=task_id, round_number=round_number)
        assert positions_of(info.aggregated_mask) == [0, 1]
        published = market.global_model(task_id=task_id, round_number=round_number + 1)
        assert summary["model_id"] == published
        assert _stored_id(aggregator.store, published) == published
        accuracy.append(summary["accuracy"])

    assert accuracy[-1] > 0.5
    task = market.task(task_id=task_id)
    assert task.state == TaskState.TRAINED

    # Redelivered work after the fact changes nothing on chain.
    late = send(
        broker,
        "worker.train_round",
        trainers[0],
        task_id=task_id,
        round_number=1,
        spec=spec,
        aggregator_url=aggregator.config.dataplane_url,
    )
    assert late.get(timeout=RESULT_TIMEOUT) is None

    # The buyer fetches the final model from the aggregator's data plane and checks its ID.
    final_id = market.global_model(task_id=task_id, round_number=SPEC.rounds)
    blob = fetch_model(
        base_url=aggregator.config.dataplane_url,
        model_id=final_id,
        server_address=aggregator.config.address,
        account=buyer,
    )
    final = serialize.decode(blob, expected_id=final_id)
    assert len(final.values) == 4
    assert (final.header.kind, final.header.task_id, final.header.round_number) == (
        serialize.Kind.GLOBAL,
        task_id,
        SPEC.rounds,
    )
    assert final.header.contract == market.address

    market.finalize(sender=platform, task_id=task_id)
    paid = {t.config.address: market.credit_of(account=t.config.address) for t in trainers}
    assert paid == {t.config.address: TRAINER_PRICE * SPEC.rounds for t in trainers}
    assert market.credit_of(account=aggregator.config.address) == AGGREGATOR_PRICE * SPEC.rounds


def test_spec_that_does_not_match_the_chain_is_refused(nodes, broker, platform_market):
    market, w3 = platform_market, platform_market.w3
    buyer = dev_accounts(1, start=6)[0]
    now = w3.eth.get_block("pending")["timestamp"]
    created = market.create_task(
        sender=buyer,
        spec_hash=SPEC.hash,
        rounds=SPEC.rounds,
        min_trainers=1,
        max_trainers=2,
        bidding_ends=now + 3600,
        round_timeout=600,
        budget_wei=10**16,
    )
    task_id = created.first(TaskCreated).task_id
    tampered = {**SPEC.as_dict(), "learning_rate": 5.0}

    result = send(broker, "worker.place_bid", nodes["alice"], task_id=task_id, spec=tampered)

    with pytest.raises(SpecMismatchError):
        result.get(timeout=RESULT_TIMEOUT)
    assert market.bids(task_id=task_id) == []
