"""Exclusions on the real chain: a global model that leaves a submitted update out says why,
and within its dispute window the reason can be contested. A reason that holds (or cannot be
checked: not fetchable) stands with its named error; a missing or false one slashes the
aggregator as a wrong aggregate does, with every wei accounted for; after the window nothing
can be contested. The excluded trainer's own watch contests a false reason by itself."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from chain.client import FlexMarket
from chain.errors import (
    DisputeWindowClosedError,
    ExclusionHoldsError,
    NotExcludedError,
    StatementMismatchError,
    UncheckableError,
)
from chain.events import (
    ExclusionContested,
    Reason,
    TaskAborted,
    TaskState,
    UpdatesExcluded,
)
from chain.fraud import ZERO_ID, Contest, Exclusion
from chain.selection import mask_of
from dataplane.audit import Aggregator, IncludedBlob, recompute
from tests.blobs import blob_of
from tests.chain.conftest import Accounts, Clock, Flow, Running
from tests.chain.oracle import settle
from tests.chain.test_disputes import PER_CHUNK, WINDOW, credited, small_values, start
from training.serialize import Kind, ModelBlob, decode, encode, id_hex
from training.store import ModelStore
from worker.watcher import watch_exclusion

KEPT = (0, 1)  # the positions the global model aggregates; position 2 is left out


def update_blob(market: FlexMarket, running: Running, values, *, author: str) -> ModelBlob:
    return decode(
        blob_of(
            list(values),
            chain_id=market.w3.eth.chain_id,
            contract=market.address,
            task_id=running.task_id,
            round_number=0,
            trainer=author,
            chunk_values=PER_CHUNK,
        )
    )


def round_with(
    flow: Flow, market: FlexMarket, *, third: Sequence[np.ndarray], third_author: int = 2
) -> tuple[Running, list[ModelBlob]]:
    """A task whose three trainers submitted round 0; the third update holds ``third``, its
    header naming trainer ``third_author``."""
    running = start(flow, market)
    values = small_values()
    blobs = []
    for position, trainer in enumerate(running.trainers):
        author = running.trainers[third_author] if position == 2 else trainer
        blob = update_blob(
            market, running, third if position == 2 else values[position], author=author.address
        )
        market.submit_update(
            sender=trainer, task_id=running.task_id, round_number=0, model_id=id_hex(blob.model_id)
        )
        blobs.append(blob)
    return running, blobs


def publish_without_third(
    market: FlexMarket, running: Running, blobs: Sequence[ModelBlob], exclusions=()
) -> ModelBlob:
    weights = {b.device: b.samples for b in market.bids(task_id=running.task_id)}
    kept = [
        IncludedBlob(
            blob=blobs[p],
            trainer=running.trainers[p].address,
            weight=weights[running.trainers[p].address],
        )
        for p in KEPT
    ]
    blob = decode(
        blob_of(
            recompute(kept, strategy="fedavg"),
            kind=Kind.GLOBAL,
            chain_id=market.w3.eth.chain_id,
            contract=market.address,
            task_id=running.task_id,
            round_number=1,
            chunk_values=PER_CHUNK,
        )
    )
    market.publish_global_model(
        sender=running.aggregator,
        task_id=running.task_id,
        round_number=1,
        model_id=id_hex(blob.model_id),
        aggregated_mask=mask_of(KEPT),
        exclusions=exclusions,
    )
    return blob


def contest(
    market: FlexMarket,
    running: Running,
    blobs: Sequence[ModelBlob],
    published: ModelBlob,
    *,
    evidence: ModelBlob | None = None,
):
    statement = market.exclusions_of(task_id=running.task_id, round_number=1)
    return market.contest_exclusion(
        sender=running.trainers[2],
        task_id=running.task_id,
        round_number=1,
        statement=statement,
        contest=Contest.of(
            update_id=id_hex(blobs[2].model_id),
            update=blobs[2].opening(0),
            global_model=published.opening(0),
            evidence_id=id_hex(evidence.model_id) if evidence else ZERO_ID,
            evidence=evidence.opening(0) if evidence else None,
        ),
    )


def test_the_reason_is_published_with_the_model(flow: Flow, market: FlexMarket):
    running, blobs = round_with(flow, market, third=small_values(2)[0], third_author=0)
    stated = (Exclusion(2, Reason.WRONG_AUTHOR),)
    publish_without_third(market, running, blobs, exclusions=stated)
    assert (
        Exclusion.decode_all(market.exclusions_of(task_id=running.task_id, round_number=1))
        == stated
    )
    events = [e for chunk in market.scan(to_block=market.w3.eth.block_number) for e in chunk.events]
    excluded = [e for e in events if isinstance(e, UpdatesExcluded)]
    assert [(e.task_id, e.round, Exclusion.decode_all(e.statement)) for e in excluded] == [
        (running.task_id, 1, stated)
    ]


@pytest.mark.parametrize(
    ("reason", "author"),
    [(Reason.WRONG_AUTHOR, 0), (Reason.COPIED, 2)],
)
def test_an_honest_exclusion_stands(flow: Flow, market: FlexMarket, reason: Reason, author: int):
    """An update whose header names another trainer, or whose values repeat trainer 0's, was
    rightly left out: its contest reverts and the task runs on."""
    third = small_values()[0] if reason == Reason.COPIED else small_values(2)[0]
    running, blobs = round_with(flow, market, third=third, third_author=author)
    evidence = blobs[0] if reason == Reason.COPIED else None
    stated = Exclusion(2, reason, id_hex(evidence.model_id) if evidence else ZERO_ID)
    published = publish_without_third(market, running, blobs, exclusions=[stated])
    with pytest.raises(ExclusionHoldsError) as exc:
        contest(market, running, blobs, published, evidence=evidence)
    assert (exc.value.position, exc.value.reason) == (2, reason)
    assert market.task(task_id=running.task_id).state == TaskState.RUNNING


def test_not_fetchable_cannot_be_contested(flow: Flow, market: FlexMarket):
    running, blobs = round_with(flow, market, third=small_values(2)[0])
    published = publish_without_third(
        market, running, blobs, exclusions=[Exclusion(2, Reason.NOT_FETCHABLE)]
    )
    with pytest.raises(UncheckableError):
        contest(market, running, blobs, published)
    assert market.task(task_id=running.task_id).state == TaskState.RUNNING


@pytest.mark.parametrize(
    "stated",
    [
        (),  # left out without a word
        (Exclusion(2, Reason.WRONG_AUTHOR),),
        (Exclusion(2, Reason.WRONG_LAYOUT),),
        (Exclusion(2, Reason.SAMPLES_OUT_OF_RANGE),),
        (Exclusion(2, Reason.COPIED, "0x" + "11" * 32),),  # a model that does not exist
    ],
    ids=["unstated", "wrong-author", "wrong-layout", "samples", "copied-unknown"],
)
def test_a_false_exclusion_is_slashed_and_every_wei_accounted_for(
    flow: Flow, market: FlexMarket, stated
):
    running, blobs = round_with(flow, market, third=small_values(2)[0])
    published = publish_without_third(market, running, blobs, exclusions=stated)
    task = market.task(task_id=running.task_id)
    held_before = market.balance_wei()
    challenger = running.trainers[2].address
    result = contest(market, running, blobs, published)

    event = result.first(ExclusionContested)
    reason = stated[0].reason if stated else Reason.UNSTATED
    assert (event.round, event.challenger, event.position, event.reason) == (
        1,
        challenger,
        2,
        reason,
    )
    assert event.bounty_wei == task.aggregator_bond_wei // 4
    assert result.first(TaskAborted).task_id == running.task_id
    assert market.task(task_id=running.task_id).state == TaskState.ABORTED
    got = credited(result)
    expected = settle(
        budget=running.budget_wei,
        buyer=running.buyer.address,
        aggregator=running.aggregator.address,
        aggregator_price=running.aggregator_price_wei,
        trainers=[t.address for t in running.trainers],
        prices=running.prices_wei,
        stake=task.trainer_stake_wei,
        bond=task.aggregator_bond_wei,
        aggregated=[(mask_of(KEPT), None)],
        submitted=[mask_of(range(3))],
        aborted=True,
        challenger=challenger,
        aggregator_rounds=0,
    )
    assert got == expected.credits
    deposits = task.aggregator_bond_wei + 3 * task.trainer_stake_wei
    assert sum(got.values()) == running.budget_wei + deposits
    assert market.balance_wei() == held_before == market.credits_owed() + market.escrow_locked()


def test_a_copy_claim_with_other_values_is_slashed(flow: Flow, market: FlexMarket):
    running, blobs = round_with(flow, market, third=small_values(2)[0])
    stated = Exclusion(2, Reason.COPIED, id_hex(blobs[0].model_id))
    published = publish_without_third(market, running, blobs, exclusions=[stated])
    result = contest(market, running, blobs, published, evidence=blobs[0])
    assert result.first(ExclusionContested).reason == Reason.COPIED


def test_a_contest_after_the_window_reverts(flow: Flow, market: FlexMarket, clock: Clock):
    running, blobs = round_with(flow, market, third=small_values(2)[0])
    published = publish_without_third(
        market, running, blobs, exclusions=[Exclusion(2, Reason.WRONG_AUTHOR)]
    )
    clock.advance(WINDOW + 1)
    with pytest.raises(DisputeWindowClosedError) as exc:
        contest(market, running, blobs, published)
    assert (exc.value.task_id, exc.value.round) == (running.task_id, 1)
    assert market.task(task_id=running.task_id).state == TaskState.RUNNING


def test_a_contest_must_use_the_published_statement_and_an_excluded_update(
    flow: Flow, market: FlexMarket, accounts: Accounts
):
    running, blobs = round_with(flow, market, third=small_values(2)[0])
    published = publish_without_third(
        market, running, blobs, exclusions=[Exclusion(2, Reason.WRONG_AUTHOR)]
    )
    honest = Contest.of(
        update_id=id_hex(blobs[2].model_id),
        update=blobs[2].opening(0),
        global_model=published.opening(0),
    )
    with pytest.raises(StatementMismatchError):
        market.contest_exclusion(
            sender=accounts.outsider,
            task_id=running.task_id,
            round_number=1,
            statement=b"",
            contest=honest,
        )
    statement = market.exclusions_of(task_id=running.task_id, round_number=1)
    included = Contest.of(
        update_id=id_hex(blobs[0].model_id),
        update=blobs[0].opening(0),
        global_model=published.opening(0),
    )
    with pytest.raises(NotExcludedError) as exc:
        market.contest_exclusion(
            sender=accounts.outsider,
            task_id=running.task_id,
            round_number=1,
            statement=statement,
            contest=included,
        )
    assert exc.value.position == 0


@pytest.mark.parametrize(
    ("stated", "author", "slashed"),
    [
        (Reason.WRONG_AUTHOR, 2, True),  # false: the header names its own trainer
        (Reason.WRONG_AUTHOR, 0, False),  # true: it names trainer 0
        (Reason.NOT_FETCHABLE, 2, False),  # cannot be checked: only logged
    ],
    ids=["false", "true", "not-fetchable"],
)
def test_the_excluded_trainers_watch_contests_a_false_reason_itself(
    flow: Flow, market: FlexMarket, tmp_path, caplog, stated, author, slashed
):
    running, blobs = round_with(flow, market, third=small_values(2)[0], third_author=author)
    published = publish_without_third(market, running, blobs, exclusions=[Exclusion(2, stated)])
    own = ModelStore(tmp_path / "trainer")
    own.put(encode(blobs[2].header, blobs[2].values))
    contested = watch_exclusion(
        market=market,
        store=own,
        account=running.trainers[2],
        task_id=running.task_id,
        round_number=0,
        published=published,
        aggregator=Aggregator(running.aggregator.address, "https://127.0.0.1:9", "00" * 32),
        info=market.round_info(task_id=running.task_id, round_number=0),
        position=2,
    )
    state = market.task(task_id=running.task_id).state
    if slashed:
        assert (contested.position, contested.reason) == (2, stated)
        assert state == TaskState.ABORTED
    else:
        assert contested is None
        assert state == TaskState.RUNNING
        assert ("rightly left out" if author == 0 else "not fetchable") in caplog.text
