"""Contribution scores: what each update of a round adds to the global model, measured on the
buyer's validation set, as the uint16 scores the contract shares a round's pay by.

The method (docs/scoring.md) is the round-wise Shapley value of each update (Shapley 1953;
for FL rounds, Song, Tong and Wei, "Profit Allocation for Federated Learning", IEEE Big
Data 2019, and Liu et al., "GTG-Shapley", ACM TIST 2022): the value of a set of updates is
how far the validation loss of their aggregate falls below that of the round's own global
model, and each update gets its mean marginal value over the orders of arrival. Unlike
leave-one-out, an update whose data no other trainer has still earns when another update
overlaps it. Aggregation is bit-exact (training.aggregation), so every model scored is the
same on every machine; the losses are taken by ``losses_of``, which the caller keeps
deterministic (training.evaluate), and scores are quantised once, at the end.

Before scoring, updates that are provably not their author's work are set aside (``junk``):
values equal to a model the aggregator already knows (the round's global model, an earlier
global model, an earlier update) or to another update of the round. They score zero and are
left out of the aggregate and its mask. Every other update that the strategy accepts scores
at least FLOOR, so the round's pool is shared among all valid updates rather than withheld.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from core.hashing import keccak
from training.aggregation.base import RULE_COPY, Rejection, Strategy, Update
from training.aggregation.functions import Sums, WeightedTally, Weights

FULL_SCALE = 0xFFFF
# A valid update that adds nothing measurable (or even hurts, as unusual data may on the
# buyer's set) still gets 1/64 of what the round's best update scores.
FLOOR = FULL_SCALE // 64
# Up to this many updates every subset is evaluated (2^n aggregates); above, orders are sampled.
EXACT_MAX = 8
# The exact method's aggregates go to ``losses_of`` this many values' worth at a time (at
# most every subset at once): a batched evaluation costs far fewer calls, and this bounds
# the memory the batch holds.
BATCH_VALUES = 1 << 22
PERMUTATIONS = 32
TRUNCATION = 0.01


def fedavg_weight(samples: int, score: int | None) -> int:
    """An aggregated update's FedAvg weight: its sample count as the contract records it,
    scaled by its score when the round is scored (``samples * score // FULL_SCALE``, at least
    1). The round's best update weighs its samples; one at FLOOR, 1/64 of them: what the
    buyer's validation set shows adds nothing barely moves the model. Integer arithmetic, the
    same in the contract, the aggregator, a watcher and the provenance command."""
    if score is None:
        return samples
    return max(1, samples * score // FULL_SCALE)


def values_digest(weights: Sequence) -> bytes:
    """keccak256 of a model's int32 values alone (not its header): equal weights, equal digest."""
    return keccak(b"".join(np.asarray(layer).astype("<i4").tobytes() for layer in weights))


@dataclass(frozen=True)
class Junk:
    """Updates split into those that may be scored and those that copy known weights."""

    kept: list[Update] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def junk(
    updates: Sequence[Update],
    *,
    known: Mapping[bytes, str],
    known_ids: Mapping[bytes, str] | None = None,
) -> Junk:
    """Set aside each update whose values equal a model in ``known`` (values digest -> what
    it is, e.g. "the round's global model"; ``known_ids``: digest -> its model ID) or an
    earlier update in ``updates`` (the first of equal updates, in the given order, is kept).
    Each rejection names the copied model's ID as its evidence, where known."""
    out = Junk()
    seen: dict[bytes, str] = dict(known)
    ids: dict[bytes, str] = dict(known_ids or {})
    for update in updates:
        digest = values_digest(update.weights)
        if digest in seen:
            out.rejected.append(
                Rejection(
                    update_id=update.update_id,
                    reason=f"a copy of {seen[digest]}",
                    rule=RULE_COPY,
                    evidence=ids.get(digest, ""),
                )
            )
            continue
        seen[digest] = f"update {update.update_id}"
        ids[digest] = update.update_id
        out.kept.append(update)
    return out


@dataclass(frozen=True)
class Scores:
    """Each update's Shapley value (validation loss decrease it accounts for) and uint16 score."""

    gains: dict[str, float]
    scores: dict[str, int]
    loss: float  # of the aggregate of every update
    evaluations: int  # distinct coalitions evaluated


def quantize_gains(gains: Sequence[float]) -> list[int]:
    """uint16 scores from gains: FLOOR plus a share of the rest proportional to the positive
    gain over the best gain; every score FLOOR when no gain is positive."""
    best = max((g for g in gains if g > 0), default=0.0)
    if best <= 0:
        return [FLOOR] * len(gains)
    return [FLOOR + int((FULL_SCALE - FLOOR) * (max(g, 0.0) / best)) for g in gains]


def _permutations(count: int, *, n: int, seed: Sequence[int]) -> Iterator[list[int]]:
    """``count`` permutations of range(n) by Fisher-Yates over raw PCG64 output, which (unlike a
    Generator's methods) no numpy release changes: every node draws the same ones."""
    bits = np.random.PCG64(np.random.SeedSequence(list(seed)))
    for _ in range(count):
        order = list(range(n))
        for i in range(n - 1, 0, -1):
            j = int(bits.random_raw()) % (i + 1)
            order[i], order[j] = order[j], order[i]
        yield order


def _walk_together(
    orders: Sequence[Sequence[int]],
    *,
    total: float,
    values: Mapping[int, float],
    measure: Callable[[Sequence[int], Mapping[int, Weights]], None],
    batch: int,
    tally: WeightedTally | None,
) -> None:
    """Evaluate every coalition the sampled ``orders`` reach before their truncation, a step
    of all of them at a time: each step's new coalitions go to ``measure`` together, ``batch``
    at most per call. The walk in order that follows finds every value it needs; the
    coalitions are those it would evaluate itself, so the scores are the same. With the
    strategy's ``tally``, each walk carries its coalition's sums, and a step's aggregates
    grow from the step before's by one update each."""
    walks: list[tuple[Sequence[int], int, Sums | None]] = [(order, 0, None) for order in orders]
    for step in range(len(orders[0]) if orders else 0):
        walks = [walk for walk in walks if abs(total - values[walk[1]]) > TRUNCATION * abs(total)]
        grown: dict[int, Sums | None] = {}
        for order, members, sums in walks:
            after = members | 1 << order[step]
            if after not in grown:
                grown[after] = tally.grow(sums, order[step]) if tally else None
        walks = [
            (order, m | 1 << order[step], grown[m | 1 << order[step]]) for order, m, _ in walks
        ]
        due = [members for members in grown if members not in values]
        for start in range(0, len(due), batch):
            chunk = due[start : start + batch]
            made = {m: tally.mean(grown[m]) for m in chunk} if tally else {}
            measure(chunk, made)


def shapley(
    updates: Sequence[Update],
    *,
    strategy: Strategy,
    reference: Weights,
    losses_of: Callable[[Sequence[Weights]], Sequence[float]],
    seed: Sequence[int] = (0,),
) -> Scores:
    """Round-wise Shapley values of ``updates`` (distinct IDs, already screened) under
    ``strategy``: the value of a set of updates is how far the validation loss of their
    aggregate falls below that of ``reference``, the round's global model (the aggregate of
    none); ``losses_of`` gives the loss of each of several weight sets. Exact over every
    subset up to EXACT_MAX updates; beyond, the mean marginal gain over PERMUTATIONS orders
    drawn from ``seed``, each cut short once the rest of the round's gain is under
    TRUNCATION of it (GTG-Shapley's within-round truncation)."""
    n = len(updates)
    [base] = losses_of([reference])
    values: dict[int, float] = {0: 0.0}

    def measure(subsets: Sequence[int], made: Mapping[int, Weights] | None = None) -> None:
        aggregates: dict[int, Weights] = {}
        for members in subsets:
            if members in values:
                continue
            if made and members in made:
                aggregate = made[members]
            else:
                aggregate = strategy.aggregate(
                    [u for i, u in enumerate(updates) if members >> i & 1]
                )
            if aggregate is None:
                values[members] = 0.0
            else:
                aggregates[members] = aggregate
        if aggregates:
            losses = losses_of(list(aggregates.values()))
            for members, loss in zip(aggregates, losses, strict=True):
                values[members] = base - loss

    def value(members: int) -> float:
        if members not in values:
            measure([members])
        return values[members]

    everyone = (1 << n) - 1
    model_values = sum(int(np.size(w)) for w in reference)
    batch = max(1, BATCH_VALUES // max(model_values, 1))
    if n <= EXACT_MAX:
        for start in range(1, everyone + 1, batch):
            measure(range(start, min(start + batch, everyone + 1)))
    total = value(everyone)
    phi = [0.0] * n
    if n <= EXACT_MAX:
        weights = [
            math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n) for k in range(n)
        ]
        for members in range(everyone + 1):
            size = members.bit_count()
            for i in range(n):
                if not members >> i & 1:
                    phi[i] += weights[size] * (value(members | 1 << i) - value(members))
    else:
        orders = list(_permutations(PERMUTATIONS, n=n, seed=seed))
        # Each walk's sums stay in memory for a step: for a small model only.
        small = PERMUTATIONS * model_values <= BATCH_VALUES
        _walk_together(
            orders,
            total=total,
            values=values,
            measure=measure,
            batch=batch,
            tally=strategy.tally(updates) if small else None,
        )
        for order in orders:
            members = 0
            for i in order:
                if abs(total - value(members)) <= TRUNCATION * abs(total):
                    break
                phi[i] += (value(members | 1 << i) - value(members)) / PERMUTATIONS
                members |= 1 << i
    ids = [u.update_id for u in updates]
    return Scores(
        gains=dict(zip(ids, phi, strict=True)),
        scores=dict(zip(ids, quantize_gains(phi), strict=True)),
        loss=base - total,
        evaluations=len(values) - 1,
    )
