"""Two tasks with identical initial models (the same catalogue model and seed) run side by side
to finalized with the same aggregator: each trainer fetches its own task's initial model from
the one aggregator store, and each task is paid in full."""

from __future__ import annotations

from collections import Counter

import pytest

from chain.events import CreditReason, PaymentCredited, TaskCreated, TaskState
from chain.launcher import dev_accounts
from core.messages import BidRequest, InitialModelRequest, RoundAggregateRequest, RoundTrainRequest
from marketplace.models import Device
from tests.worker.conftest import AGGREGATOR_PRICE, TRAINER_PRICE, wait_for
from training.catalogue import initial_weights
from training.spec import TaskSpec

pytestmark = pytest.mark.django_db(transaction=True)

SPEC = TaskSpec.from_dict(
    {"model": "digits-mlp", "dataset": "digits-8x8", "rounds": 1, "local_epochs": 1, "seed": 3}
)


def test_two_tasks_with_identical_initial_models_both_finalize_with_one_aggregator(
    nodes, platform, platform_market
):
    market, w3 = platform_market, platform_market.w3
    platform_account, buyer = dev_accounts(1)[0], dev_accounts(1, start=7)[0]
    aggregator = nodes["aggregator"]
    trainer_of = {}
    for trainer in (nodes["alice"], nodes["bob"]):
        now = w3.eth.get_block("pending")["timestamp"]
        task_id = (
            market.create_task(
                sender=buyer,
                spec_hash=SPEC.hash,
                rounds=SPEC.rounds,
                min_trainers=1,
                max_trainers=1,
                bidding_ends=now + 3600,
                round_timeout=600,
                budget_wei=10**16,
            )
            .first(TaskCreated)
            .task_id
        )
        trainer_of[task_id] = trainer
        for node in (aggregator, trainer):
            platform.send("worker.bid", BidRequest, node, task_id=task_id, spec=SPEC.as_dict())
    wait_for(lambda: all(len(market.bids(task_id=t)) == 2 for t in trainer_of))
    w3.provider.make_request("evm_increaseTime", [3601])
    w3.provider.make_request("evm_mine", [])
    for task_id, trainer in trainer_of.items():
        market.select_nodes(sender=platform_account, task_id=task_id)
        selection = market.selection(task_id=task_id)
        assert selection.aggregator == aggregator.config.address
        assert list(selection.trainers) == [trainer.config.address]

    # Both initial models hold the very same weights; each is its own task's model.
    for task_id in trainer_of:
        platform.send(
            "worker.publish_initial",
            InitialModelRequest,
            aggregator,
            task_id=task_id,
            spec=SPEC.as_dict(),
        )
    initial = {r.task_id: r.model_id for r in platform.reports(2)}
    assert initial.keys() == trainer_of.keys()
    assert len(set(initial.values())) == 2
    weights = initial_weights(spec=SPEC)
    for task_id, model_id in initial.items():
        model = aggregator.store.load(model_id)
        assert model.header.task_id == task_id
        assert [v.shape for v in model.floats()] == [w.shape for w in weights]
    first, second = (aggregator.store.load(m).values for m in initial.values())
    assert [v.tolist() for v in first] == [v.tolist() for v in second]

    devices = {d.address: d for d in Device.objects.all()}
    aggregator_cert = devices[aggregator.config.address].dataplane_cert_sha256
    for task_id, trainer in trainer_of.items():
        common = {"task_id": task_id, "round_number": 0, "spec": SPEC.as_dict()}
        address = trainer.config.address
        platform.send(
            "worker.aggregate",
            RoundAggregateRequest,
            aggregator,
            trainer_urls={address: devices[address].dataplane_url},
            trainer_certs_sha256={address: devices[address].dataplane_cert_sha256},
            **common,
        )
        platform.send(
            "worker.train",
            RoundTrainRequest,
            trainer,
            aggregator_url=aggregator.config.dataplane_url,
            aggregator_cert_sha256=aggregator_cert,
            **common,
        )
    reports = platform.reports(4)
    # Each trainer's update is on chain: it was let fetch its own task's initial model.
    assert {(r.kind, r.task_id, r.device) for r in reports if r.kind == "update"} == {
        ("update", t, trainer.config.address) for t, trainer in trainer_of.items()
    }
    assert {r.task_id: r.updates for r in reports if r.kind == "round"} == dict.fromkeys(
        trainer_of, 1
    )

    pay: Counter[str] = Counter()
    for task_id in trainer_of:
        assert market.task(task_id=task_id).state == TaskState.TRAINED
        done = market.finalize(sender=platform_account, task_id=task_id)
        assert market.task(task_id=task_id).state == TaskState.FINALIZED
        for credit in done.all(PaymentCredited):
            if credit.reason in (CreditReason.TRAINER_PAY, CreditReason.AGGREGATOR_PAY):
                pay[credit.account] += credit.amount_wei
    # A lone trainer's update takes its round's whole pool: half its price (docs/contract.md).
    for trainer in trainer_of.values():
        assert pay[trainer.config.address] == TRAINER_PRICE // 2 * SPEC.rounds
    assert pay[aggregator.config.address] == AGGREGATOR_PRICE * SPEC.rounds * len(trainer_of)
