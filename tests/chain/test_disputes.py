"""Disputes on the real chain: within a global model's window anyone but its aggregator may
prove it wrong with one chunk; the bond is slashed, the challenger paid its bounty, the task
aborted with every wei accounted for. A correct aggregate, a late or malformed challenge,
and a replay all revert with their named errors; finalize waits for the last window."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chain.client import FlexMarket
from chain.errors import (
    AggregatorCannotChallengeError,
    BadProofError,
    ChallengeFailedError,
    DisputeWindowClosedError,
    DisputeWindowOpenError,
    IdMismatchError,
    InvalidDisputeTermsError,
    InvalidTaskStateError,
    NoAggregateError,
    NotIncludedError,
)
from chain.events import (
    AggregateChallenged,
    CreditReason,
    PaymentCredited,
    Strategy,
    TaskAborted,
    TaskState,
    Verdict,
)
from chain.fraud import Challenge
from chain.selection import mask_of
from dataplane.audit import IncludedBlob, challenge, context_of, first_difference, recompute
from tests.blobs import blob_of
from tests.chain.conftest import (
    Accounts,
    Clock,
    Flow,
    Running,
    Snapshots,
)
from tests.chain.oracle import settle
from training.scoring import FLOOR, fedavg_weight
from training.serialize import Kind, ModelBlob, decode, id_hex

WINDOW = 300
PER_CHUNK = 4
INT32 = st.integers(-(2**31), 2**31 - 1)
SETTINGS = settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
TRIM = {"fedavg": 0, "fedmedian": 0, "fedtrimmedavg": 200}


@dataclass
class Disputed:
    """A task whose round-0 updates are in and whose global model 1 is published."""

    running: Running
    strategy: str
    included: list[IncludedBlob]
    published: ModelBlob
    honest: list[np.ndarray]

    def proof(self, index: int) -> Challenge:
        context = context_of(self.published, strategy=self.strategy)
        return challenge(
            context=context, published=self.published, included=self.included, index=index
        )


def params_of(strategy: str) -> dict | None:
    return {"trim_per_mille": TRIM[strategy]} if strategy == "fedtrimmedavg" else None


def start(
    flow: Flow,
    market: FlexMarket,
    *,
    strategy: str = "fedavg",
    samples: Sequence[int] = (100, 100, 100),
    rounds: int = 2,
    window: int = WINDOW,
) -> Running:
    return flow.start(
        rounds=rounds,
        samples=samples,
        dispute_window=window,
        strategy=Strategy.of(strategy),
        trim_per_mille=TRIM[strategy],
    )


def submit_updates(
    market: FlexMarket, running: Running, values: Sequence[Sequence[np.ndarray]], round_number=0
) -> list[IncludedBlob]:
    """Each trainer (by position) submits a real update blob for ``round_number``."""
    weights = {b.device: b.samples for b in market.bids(task_id=running.task_id)}
    included = []
    for trainer, weights_k in zip(running.trainers, values, strict=True):
        blob = decode(
            blob_of(
                list(weights_k),
                chain_id=market.w3.eth.chain_id,
                contract=market.address,
                task_id=running.task_id,
                round_number=round_number,
                trainer=trainer.address,
                chunk_values=PER_CHUNK,
            )
        )
        market.submit_update(
            sender=trainer,
            task_id=running.task_id,
            round_number=round_number,
            model_id=id_hex(blob.model_id),
        )
        included.append(
            IncludedBlob(blob=blob, trainer=trainer.address, weight=weights[trainer.address])
        )
    return included


def publish(
    market: FlexMarket, running: Running, values, round_number: int = 1, scores=()
) -> ModelBlob:
    blob = decode(
        blob_of(
            list(values),
            kind=Kind.GLOBAL,
            chain_id=market.w3.eth.chain_id,
            contract=market.address,
            task_id=running.task_id,
            round_number=round_number,
            chunk_values=PER_CHUNK,
        )
    )
    market.publish_global_model(
        sender=running.aggregator,
        task_id=running.task_id,
        round_number=round_number,
        model_id=id_hex(blob.model_id),
        aggregated_mask=mask_of(range(len(running.trainers))),
        scores=scores,
    )
    running.published.append(id_hex(blob.model_id))
    return blob


def lie(honest: Sequence[np.ndarray], index: int, delta: int) -> list[np.ndarray]:
    """``honest`` with flat value ``index`` changed to another int32."""
    flat = np.concatenate([np.ravel(v) for v in honest]).astype(np.int64)
    flat[index] = (flat[index] + delta + 2**31) % 2**32 - 2**31
    sizes = np.cumsum([v.size for v in honest])[:-1]
    parts = zip(np.split(flat, sizes), honest, strict=True)
    return [p.astype(np.int32).reshape(v.shape) for p, v in parts]


def disputed(
    flow: Flow,
    market: FlexMarket,
    values: Sequence[Sequence[np.ndarray]],
    *,
    strategy: str = "fedavg",
    samples: Sequence[int] = (100, 100, 100),
    wrong_at: int | None = None,
    rounds: int = 2,
) -> Disputed:
    running = start(flow, market, strategy=strategy, samples=samples, rounds=rounds)
    included = submit_updates(market, running, values)
    honest = recompute(included, strategy=strategy, params=params_of(strategy))
    shown = honest if wrong_at is None else lie(honest, wrong_at, 1)
    published = publish(market, running, shown)
    return Disputed(running, strategy, included, published, honest)


def layouts():
    return st.lists(st.integers(1, 9), min_size=1, max_size=3)


@st.composite
def rounds(draw):
    """A strategy, three updates of one random layout, their sample counts, a coordinate."""
    strategy = draw(st.sampled_from(sorted(TRIM)))
    shapes = draw(layouts())
    values = [
        [np.array(draw(st.lists(INT32, min_size=n, max_size=n)), np.int32) for n in shapes]
        for _ in range(3)
    ]
    samples = draw(st.lists(st.integers(1, 1000), min_size=3, max_size=3))
    return strategy, values, samples, draw(st.integers(0, sum(shapes) - 1))


def credited(result) -> dict[tuple[str, CreditReason], int]:
    out: dict[tuple[str, CreditReason], int] = {}
    for e in result.all(PaymentCredited):
        out[(e.account, e.reason)] = out.get((e.account, e.reason), 0) + e.amount_wei
    return out


def small_values(seed: int = 1) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.integers(-(2**20), 2**20, size=(3, 3), dtype=np.int32)] for _ in range(3)]


# ---- the rule itself


@SETTINGS
@given(case=rounds())
def test_a_correct_aggregate_cannot_be_challenged(
    flow: Flow, market: FlexMarket, accounts: Accounts, snapshots: Snapshots, case
):
    strategy, values, samples, index = case
    snapshot = snapshots.take()
    try:
        d = disputed(flow, market, values, strategy=strategy, samples=samples)
        with pytest.raises(ChallengeFailedError) as exc:
            market.challenge(
                sender=accounts.outsider,
                task_id=d.running.task_id,
                round_number=1,
                challenge=d.proof(index),
            )
        assert (exc.value.task_id, exc.value.round) == (d.running.task_id, 1)
        assert market.task(task_id=d.running.task_id).state == TaskState.RUNNING
    finally:
        snapshots.revert(snapshot)


@SETTINGS
@given(case=rounds(), delta=INT32.filter(bool))
def test_a_wrong_aggregate_is_always_slashed_and_every_wei_accounted_for(
    flow: Flow, market: FlexMarket, accounts: Accounts, snapshots: Snapshots, case, delta
):
    strategy, values, samples, index = case
    snapshot = snapshots.take()
    try:
        running = start(flow, market, strategy=strategy, samples=samples)
        included = submit_updates(market, running, values)
        honest = recompute(included, strategy=strategy, params=params_of(strategy))
        published = publish(market, running, lie(honest, index, delta))
        assert first_difference(published.values, honest) == index
        task = market.task(task_id=running.task_id)
        held_before = market.balance_wei()
        proof = challenge(
            context=context_of(published, strategy=strategy),
            published=published,
            included=included,
            index=index,
        )
        result = market.challenge(
            sender=accounts.outsider, task_id=running.task_id, round_number=1, challenge=proof
        )
        event = result.first(AggregateChallenged)
        assert (event.round, event.challenger, event.verdict) == (
            1,
            accounts.outsider.address,
            Verdict.WRONG_VALUE,
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
            aggregated=[(mask_of(range(3)), None)],
            submitted=[mask_of(range(3))],
            aborted=True,
            challenger=accounts.outsider.address,
            aggregator_rounds=0,
        )
        assert got == expected.credits
        deposits = task.aggregator_bond_wei + 3 * task.trainer_stake_wei
        assert sum(got.values()) == running.budget_wei + deposits
        assert (running.aggregator.address, CreditReason.STAKE_RETURNED) not in got
        assert market.balance_wei() == held_before == market.credits_owed() + market.escrow_locked()
    finally:
        snapshots.revert(snapshot)


def test_a_scored_round_is_checked_with_each_update_weighed_by_its_score(
    flow: Flow, market: FlexMarket, accounts: Accounts, snapshots: Snapshots
):
    """In a scored round the contract weighs each update by its samples scaled by its score,
    as the aggregator must (training.scoring.fedavg_weight): that aggregate stands, and one
    weighed by samples alone is proven wrong."""
    scores = [65535, FLOOR, 30000]
    for weighed_by_score in (True, False):
        snapshot = snapshots.take()
        try:
            running = start(flow, market, samples=(300, 200, 100))
            included = submit_updates(market, running, small_values())
            by_score = [
                dataclasses.replace(u, weight=fedavg_weight(u.weight, s))
                for u, s in zip(included, scores, strict=True)
            ]
            right, samples_only = (
                recompute(by_score, strategy="fedavg"),
                recompute(included, strategy="fedavg"),
            )
            index = first_difference(right, samples_only)
            assert index is not None
            shown = right if weighed_by_score else samples_only
            published = publish(market, running, shown, scores=scores)
            proof = challenge(
                context=context_of(published, strategy="fedavg"),
                published=published,
                included=by_score,
                index=index,
            )
            if weighed_by_score:
                with pytest.raises(ChallengeFailedError):
                    market.challenge(
                        sender=accounts.outsider,
                        task_id=running.task_id,
                        round_number=1,
                        challenge=proof,
                    )
                assert market.task(task_id=running.task_id).state == TaskState.RUNNING
            else:
                result = market.challenge(
                    sender=accounts.outsider,
                    task_id=running.task_id,
                    round_number=1,
                    challenge=proof,
                )
                assert result.first(AggregateChallenged).verdict == Verdict.WRONG_VALUE
        finally:
            snapshots.revert(snapshot)


# ---- who may challenge, and when


def test_the_buyer_may_challenge_but_the_aggregator_may_not(
    flow: Flow, market: FlexMarket, accounts: Accounts
):
    d = disputed(flow, market, small_values(), wrong_at=4)
    proof = d.proof(4)
    with pytest.raises(AggregatorCannotChallengeError):
        market.challenge(
            sender=d.running.aggregator, task_id=d.running.task_id, round_number=1, challenge=proof
        )
    result = market.challenge(
        sender=d.running.buyer, task_id=d.running.task_id, round_number=1, challenge=proof
    )
    assert result.first(AggregateChallenged).challenger == d.running.buyer.address


def test_a_challenge_after_the_window_reverts(
    flow: Flow, market: FlexMarket, accounts: Accounts, clock: Clock
):
    d = disputed(flow, market, small_values(), wrong_at=0)
    closes = market.dispute_closes_at(task_id=d.running.task_id, round_number=1)
    assert closes == clock.now() + WINDOW
    clock.mine_at(closes + 1)
    with pytest.raises(DisputeWindowClosedError) as exc:
        market.challenge(
            sender=accounts.outsider,
            task_id=d.running.task_id,
            round_number=1,
            challenge=d.proof(0),
        )
    assert exc.value.closed_at == closes


def test_a_task_without_a_window_takes_no_challenge(
    flow: Flow, market: FlexMarket, accounts: Accounts
):
    running = start(flow, market, window=0)
    included = submit_updates(market, running, small_values())
    published = publish(market, running, lie(recompute(included, strategy="fedavg"), 0, 1))
    proof = challenge(
        context=context_of(published, strategy="fedavg"),
        published=published,
        included=included,
        index=0,
    )
    with pytest.raises(DisputeWindowClosedError):
        market.challenge(
            sender=accounts.outsider, task_id=running.task_id, round_number=1, challenge=proof
        )


def test_a_bad_proof_reverts_with_the_verifiers_error(
    flow: Flow, market: FlexMarket, accounts: Accounts
):
    d = disputed(flow, market, small_values(), wrong_at=5)
    sent = d.proof(5)
    opened = sent.updates[1]
    forged = dataclasses.replace(opened, siblings=(bytes(32), *opened.siblings[1:]))
    with pytest.raises(BadProofError) as exc:
        market.challenge(
            sender=accounts.outsider,
            task_id=d.running.task_id,
            round_number=1,
            challenge=dataclasses.replace(sent, updates=(sent.updates[0], forged, sent.updates[2])),
        )
    assert exc.value.which == 2
    # An opening of another model than the one the ID names proves nothing either.
    with pytest.raises(IdMismatchError):
        market.challenge(
            sender=accounts.outsider,
            task_id=d.running.task_id,
            round_number=1,
            challenge=dataclasses.replace(sent, updates=(sent.updates[1], *sent.updates[1:])),
        )
    assert market.task(task_id=d.running.task_id).state == TaskState.RUNNING


def test_the_included_updates_are_the_ones_the_chain_recorded(
    flow: Flow, market: FlexMarket, accounts: Accounts
):
    d = disputed(flow, market, small_values(), wrong_at=3)
    sent = d.proof(3)
    swapped = dataclasses.replace(
        sent,
        included=(sent.included[1], sent.included[0], sent.included[2]),
        updates=(sent.updates[1], sent.updates[0], sent.updates[2]),
    )
    with pytest.raises(NotIncludedError) as exc:
        market.challenge(
            sender=accounts.outsider, task_id=d.running.task_id, round_number=1, challenge=swapped
        )
    assert (exc.value.index, exc.value.model_id) == (0, sent.included[1].model_id)
    dropped = dataclasses.replace(sent, included=sent.included[:2], updates=sent.updates[:2])
    with pytest.raises(NotIncludedError) as exc:
        market.challenge(
            sender=accounts.outsider, task_id=d.running.task_id, round_number=1, challenge=dropped
        )
    assert exc.value.index == 2
    for round_number in (0, 2):
        with pytest.raises(NoAggregateError):
            market.challenge(
                sender=accounts.outsider,
                task_id=d.running.task_id,
                round_number=round_number,
                challenge=sent,
            )


def test_a_successful_challenge_cannot_be_replayed(
    flow: Flow, market: FlexMarket, accounts: Accounts
):
    d = disputed(flow, market, small_values(), wrong_at=2)
    market.challenge(
        sender=accounts.outsider, task_id=d.running.task_id, round_number=1, challenge=d.proof(2)
    )
    with pytest.raises(InvalidTaskStateError) as exc:
        market.challenge(
            sender=accounts.spare[0],
            task_id=d.running.task_id,
            round_number=1,
            challenge=d.proof(2),
        )
    assert exc.value.state == TaskState.ABORTED


# ---- the final model and finalize


def test_finalize_waits_for_the_last_window_and_the_final_model_can_be_challenged(
    flow: Flow, market: FlexMarket, accounts: Accounts, clock: Clock, snapshots: Snapshots
):
    d = disputed(flow, market, small_values(), rounds=1, wrong_at=7)
    task = market.task(task_id=d.running.task_id)
    assert task.state == TaskState.TRAINED
    assert task.dispute_closes_at == clock.now() + WINDOW
    with pytest.raises(DisputeWindowOpenError) as exc:
        market.finalize(sender=accounts.outsider, task_id=d.running.task_id)
    assert exc.value.closes_at == task.dispute_closes_at

    snapshot = snapshots.take()
    result = market.challenge(
        sender=d.running.trainers[0],
        task_id=d.running.task_id,
        round_number=1,
        challenge=d.proof(7),
    )
    # One round: the only aggregate was wrong, so the aggregator earns nothing.
    assert result.first(TaskAborted).aggregator_paid_wei == 0
    snapshots.revert(snapshot)

    clock.mine_at(task.dispute_closes_at + 1)
    with pytest.raises(DisputeWindowClosedError):
        market.challenge(
            sender=accounts.outsider,
            task_id=d.running.task_id,
            round_number=1,
            challenge=d.proof(7),
        )
    market.finalize(sender=accounts.outsider, task_id=d.running.task_id)
    assert market.task(task_id=d.running.task_id).state == TaskState.FINALIZED


def test_a_later_wrong_round_keeps_the_earlier_rounds_pay(
    flow: Flow, market: FlexMarket, accounts: Accounts
):
    """Global 1 is right, global 2 wrong: trainers are paid both rounds they delivered, the
    aggregator only round 1."""
    running = start(flow, market, rounds=3)
    first = submit_updates(market, running, small_values(1), round_number=0)
    publish(market, running, recompute(first, strategy="fedavg"), round_number=1)
    second = submit_updates(market, running, small_values(2), round_number=1)
    honest = recompute(second, strategy="fedavg")
    published = publish(market, running, lie(honest, 8, -5), round_number=2)
    task = market.task(task_id=running.task_id)
    proof = challenge(
        context=context_of(published, strategy="fedavg"),
        published=published,
        included=second,
        index=8,
    )
    result = market.challenge(
        sender=accounts.outsider, task_id=running.task_id, round_number=2, challenge=proof
    )
    expected = settle(
        budget=running.budget_wei,
        buyer=running.buyer.address,
        aggregator=running.aggregator.address,
        aggregator_price=running.aggregator_price_wei,
        trainers=[t.address for t in running.trainers],
        prices=running.prices_wei,
        stake=task.trainer_stake_wei,
        bond=task.aggregator_bond_wei,
        aggregated=[(mask_of(range(3)), None)] * 2,
        submitted=[mask_of(range(3))] * 2,
        aborted=True,
        challenger=accounts.outsider.address,
        aggregator_rounds=1,
    )
    assert credited(result) == expected.credits
    assert result.first(TaskAborted).aggregator_paid_wei == running.aggregator_price_wei


@pytest.mark.parametrize(
    ("terms", "field"),
    [
        ({"dispute_window": 30 * 86_400 + 1}, "dispute_window"),
        ({"strategy": Strategy.FED_TRIMMED_AVG, "trim_per_mille": 500}, "trim_per_mille"),
        ({"strategy": Strategy.FED_AVG, "trim_per_mille": 100}, "trim_per_mille"),
    ],
)
def test_dispute_terms_out_of_range_are_refused(flow: Flow, terms, field):
    with pytest.raises(InvalidDisputeTermsError) as exc:
        flow.create_task(**terms)
    assert exc.value.fields[field] == terms[field]


def test_the_terms_are_on_chain(flow: Flow, market: FlexMarket):
    task_id = flow.create_task(
        dispute_window=120, strategy=Strategy.FED_TRIMMED_AVG, trim_per_mille=100
    )
    task = market.task(task_id=task_id)
    assert (task.dispute_window, task.strategy, task.trim_per_mille) == (
        120,
        Strategy.FED_TRIMMED_AVG,
        100,
    )
    assert market.verifier() != "0x" + "00" * 20


def test_a_trainer_that_could_not_fetch_the_global_model_keeps_its_stake(
    flow: Flow, market: FlexMarket, accounts: Accounts, clock: Clock
):
    """The aggregator publishes global model 1 and serves it to nobody: nobody trains round
    1, the aggregator cannot publish an empty round and is aborted, and no trainer loses its
    stake for the round it could not train in."""
    running = start(flow, market, rounds=3)
    first = submit_updates(market, running, small_values(1), round_number=0)
    publish(market, running, recompute(first, strategy="fedavg"), round_number=1)
    clock.mine_at(market.task(task_id=running.task_id).publish_deadline + 1)
    result = market.abort(sender=accounts.outsider, task_id=running.task_id)
    got = credited(result)
    stake = market.task(task_id=running.task_id).trainer_stake_wei
    for trainer in running.trainers:
        assert got[(trainer.address, CreditReason.STAKE_RETURNED)] == stake
    assert (
        result.first(TaskAborted).slashed_wei
        == market.task(task_id=running.task_id).aggregator_bond_wei
    )
