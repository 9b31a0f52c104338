"""A challenged aggregate as chain sync mirrors it and the buyer's page shows it, against the
real Anvil and database: the dispute terms, who proved which round wrong, the bounty, the
aborted task; and the updates a round left out, with the reason stated on chain."""

from __future__ import annotations

import numpy as np
import pytest

from chain.events import Reason, Role, Strategy, TaskCreated
from chain.fraud import Contest, Exclusion
from chain.selection import mask_of
from dataplane.audit import IncludedBlob, challenge, context_of, recompute
from marketplace.models import Payout, PayoutReason, Task, TaskState, Update
from marketplace.selectors import TaskView
from marketplace.serializers import TaskSerializer
from marketplace.sync import ChainSync
from marketplace.task_page import page_view
from tests.blobs import blob_of
from tests.marketplace.test_sync import (
    PRICE,
    SPEC,
    chain_now,
    mirror_env,  # noqa: F401  (a fixture)
    new_device,
    register,
)
from training.serialize import Kind, decode, id_hex

pytestmark = pytest.mark.django_db(transaction=True)

WINDOW = 900


def _blob(market, task_id: int, values, **header):
    return decode(
        blob_of(
            values,
            chain_id=market.w3.eth.chain_id,
            contract=market.address,
            task_id=task_id,
            chunk_values=4,
            **header,
        )
    )


@pytest.mark.usefixtures("mirror_env")
def test_a_challenged_aggregate_is_mirrored_and_shown(platform_market):
    market, w3 = platform_market, platform_market.w3
    trainer, aggregator = new_device(w3, "trainer"), new_device(w3, "aggregator")
    buyer, challenger = new_device(w3, "buyer"), new_device(w3, "challenger")
    register(market, trainer)
    register(market, aggregator, aggregate=True)
    task_id = (
        market.create_task(
            sender=buyer,
            spec_hash=SPEC.hash,
            rounds=2,
            min_trainers=1,
            max_trainers=1,
            bidding_ends=chain_now(w3) + 60,
            round_timeout=600,
            budget_wei=10**16,
            dispute_window=WINDOW,
            strategy=Strategy.FED_AVG,
        )
        .first(TaskCreated)
        .task_id
    )
    market.place_bid(
        sender=trainer, task_id=task_id, price_per_round_wei=PRICE, samples=50, role=Role.TRAINER
    )
    market.place_bid(
        sender=aggregator, task_id=task_id, price_per_round_wei=PRICE, samples=1,
        role=Role.AGGREGATOR,
    )  # fmt: skip
    w3.provider.make_request("evm_increaseTime", [61])
    market.select_nodes(sender=buyer, task_id=task_id)
    values = [np.arange(-4, 5, dtype=np.int32).reshape(3, 3) * 1000]
    initial = _blob(market, task_id, values, kind=Kind.GLOBAL, round_number=0)
    market.publish_global_model(
        sender=aggregator, task_id=task_id, round_number=0, model_id=id_hex(initial.model_id),
        aggregated_mask=0,
    )  # fmt: skip
    update = _blob(market, task_id, values, round_number=0, trainer=trainer.address)
    market.submit_update(
        sender=trainer, task_id=task_id, round_number=0, model_id=id_hex(update.model_id)
    )
    included = [IncludedBlob(blob=update, trainer=trainer.address, weight=50)]
    wrong = [recompute(included, strategy="fedavg")[0] + 1]
    published = _blob(market, task_id, wrong, kind=Kind.GLOBAL, round_number=1)
    market.publish_global_model(
        sender=aggregator, task_id=task_id, round_number=1, model_id=id_hex(published.model_id),
        aggregated_mask=mask_of([0]),
    )  # fmt: skip
    proof = challenge(
        context=context_of(published, strategy="fedavg"),
        published=published,
        included=included,
        index=0,
    )
    done = market.challenge(sender=challenger, task_id=task_id, round_number=1, challenge=proof)

    ChainSync().run()
    task = Task.objects.get(chain_task_id=task_id)
    assert task.state == TaskState.ABORTED
    assert task.dispute_window_s == WINDOW
    assert (task.challenged_round, task.challenged_by, task.challenge_tx) == (
        1,
        challenger.address,
        done.tx_hash,
    )
    bounty = market.task(task_id=task_id).aggregator_bond_wei // 4
    assert task.challenge_bounty_wei == bounty
    paid = Payout.objects.get(task=task, reason=PayoutReason.CHALLENGE_BOUNTY)
    assert (paid.account, paid.amount_wei) == (challenger.address, bounty)

    snapshot = TaskSerializer(TaskView(task=task, order=None)).data
    assert snapshot["challenged_round"] == 1
    page = page_view(snapshot)
    assert page["round_note"] == "aggregate of round 1 challenged: aggregator slashed"
    assert "Aggregate challenged" in [s["label"] for s in page["steps"]]
    assert page["tx_rows"][-1]["label"].startswith("Aggregate challenged · Task aborted")


@pytest.mark.usefixtures("mirror_env")
def test_excluded_updates_are_mirrored_and_shown_with_their_reason(platform_market):
    """Three trainers: the first aggregated, the second left out for naming another author
    (true), the third left out without a reason, which it contests: each row and page cell
    says why, and the contest ends the task as a challenge does."""
    market, w3 = platform_market, platform_market.w3
    trainers = [new_device(w3, f"trainer-{k}") for k in range(3)]
    aggregator, buyer = new_device(w3, "aggregator"), new_device(w3, "buyer")
    for trainer in trainers:
        register(market, trainer)
    register(market, aggregator, aggregate=True)
    task_id = (
        market.create_task(
            sender=buyer,
            spec_hash=SPEC.hash,
            rounds=2,
            min_trainers=3,
            max_trainers=3,
            bidding_ends=chain_now(w3) + 60,
            round_timeout=600,
            budget_wei=10**16,
            dispute_window=WINDOW,
            strategy=Strategy.FED_AVG,
        )
        .first(TaskCreated)
        .task_id
    )
    for trainer in trainers:
        market.place_bid(
            sender=trainer, task_id=task_id, price_per_round_wei=PRICE, samples=50,
            role=Role.TRAINER,
        )  # fmt: skip
    market.place_bid(
        sender=aggregator, task_id=task_id, price_per_round_wei=PRICE, samples=1,
        role=Role.AGGREGATOR,
    )  # fmt: skip
    w3.provider.make_request("evm_increaseTime", [61])
    market.select_nodes(sender=buyer, task_id=task_id)
    by_position = market.selection(task_id=task_id).trainers
    trainers.sort(key=lambda t: by_position.index(t.address))
    values = [np.arange(-4, 5, dtype=np.int32).reshape(3, 3) * 1000]
    initial = _blob(market, task_id, values, kind=Kind.GLOBAL, round_number=0)
    market.publish_global_model(
        sender=aggregator, task_id=task_id, round_number=0, model_id=id_hex(initial.model_id),
    )  # fmt: skip
    updates = []
    for k, trainer in enumerate(trainers):
        author = trainers[0] if k == 1 else trainer
        update = _blob(market, task_id, [values[0] + k], round_number=0, trainer=author.address)
        market.submit_update(
            sender=trainer, task_id=task_id, round_number=0, model_id=id_hex(update.model_id)
        )
        updates.append(update)
    published = _blob(market, task_id, [values[0]], kind=Kind.GLOBAL, round_number=1)
    market.publish_global_model(
        sender=aggregator, task_id=task_id, round_number=1, model_id=id_hex(published.model_id),
        aggregated_mask=mask_of([0]), exclusions=[Exclusion(1, Reason.WRONG_AUTHOR)],
    )  # fmt: skip
    ChainSync().run()
    task = Task.objects.get(chain_task_id=task_id)
    rows = {u.position: u.exclusion_reason for u in Update.objects.filter(task=task)}
    assert rows == {0: "", 1: "wrong_author", 2: ""}
    page = page_view(TaskSerializer(TaskView(task=task, order=None)).data)
    cells = {r["trainer"]: r["cells"][0] for r in page["contribution_rows"]}
    assert [cells[t.address] for t in trainers[1:]] == [
        "left out: names another trainer",
        "left out: no reason stated",
    ]

    done = market.contest_exclusion(
        sender=trainers[2],
        task_id=task_id,
        round_number=1,
        statement=market.exclusions_of(task_id=task_id, round_number=1),
        contest=Contest.of(
            update_id=id_hex(updates[2].model_id),
            update=updates[2].opening(0),
            global_model=published.opening(0),
        ),
    )
    ChainSync().run()
    task.refresh_from_db()
    assert task.state == TaskState.ABORTED
    assert (task.challenged_round, task.challenged_by, task.challenge_tx) == (
        1,
        trainers[2].address,
        done.tx_hash,
    )
    assert task.challenge_bounty_wei == market.task(task_id=task_id).aggregator_bond_wei // 4
