"""Recompute a global model from its updates and, where it differs, build the fraud proof.

Anyone holding the blobs can do this (docs/verifiable.md): the aggregate is exact integer
arithmetic, so a recomputation equals the published model to the bit or the aggregator lied.
The challenge names the first coordinate that differs and opens its chunk in every model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from chain.client import FlexMarket
from chain.fraud import Challenge, Included, RoundContext, Strategy
from chain.selection import positions_of
from training.aggregation import STRATEGIES, Update
from training.scoring import fedavg_weight
from training.serialize import ModelBlob, id_hex


@dataclass(frozen=True)
class IncludedBlob:
    """An update the global model includes, with its bytes and its weight on chain."""

    blob: ModelBlob
    trainer: str
    weight: int


def recorded_samples(market: FlexMarket, *, task_id: int) -> dict[str, int]:
    """Each bidder's sample count as the contract records it (its bid's, capped at the
    task's sample cap), by checksummed address."""
    return {b.device: b.samples for b in market.bids(task_id=task_id)}


def round_weights(
    market: FlexMarket, *, task_id: int, round_number: int, trainers: Sequence[str]
) -> dict[str, int]:
    """The FedAvg weight of each update global model ``round_number + 1`` aggregated, by
    trainer: its recorded samples scaled by its score on chain (training.scoring.fedavg_weight):
    what the aggregator weighs with and a challenge is checked by. ``trainers`` is the
    task's selection, in position order."""
    info = market.round_info(task_id=task_id, round_number=round_number)
    samples = recorded_samples(market, task_id=task_id)
    positions = positions_of(info.aggregated_mask)
    scores = dict(zip(positions, info.scores, strict=True)) if info.scores else {}
    return {trainers[p]: fedavg_weight(samples[trainers[p]], scores.get(p)) for p in positions}


def recompute(
    included: Sequence[IncludedBlob], *, strategy: str, params: dict | None = None
) -> list[np.ndarray]:
    """The aggregate the task's strategy gives over ``included``, in their order."""
    rule = STRATEGIES[strategy].from_params(dict(params or {}))
    updates = [Update(weights=u.blob.values, num_examples=u.weight) for u in included]
    return rule.aggregate(updates)


def first_difference(published: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> int | None:
    """The flat index of the first value where two models differ, or None when they are equal."""
    offset = 0
    for a, b in zip(published, expected, strict=True):
        unequal = np.flatnonzero(np.ravel(a) != np.ravel(b))
        if unequal.size:
            return offset + int(unequal[0])
        offset += int(np.size(a))
    return None


def challenge(
    *,
    context: RoundContext,
    published: ModelBlob,
    included: Sequence[IncludedBlob],
    index: int,
) -> Challenge:
    """The challenge of value ``index`` (flat) of ``published`` against ``included``."""
    per_chunk = published.header.chunk_values
    chunk, offset = divmod(index, per_chunk)
    return Challenge(
        context=context,
        global_id=id_hex(published.model_id),
        included=tuple(
            Included(model_id=id_hex(u.blob.model_id), trainer=u.trainer, weight=u.weight)
            for u in included
        ),
        chunk=chunk,
        offset=offset,
        global_opening=published.opening(chunk),
        updates=tuple(u.blob.opening(chunk) for u in included),
    )


def context_of(published: ModelBlob, *, strategy: str, params: dict | None = None) -> RoundContext:
    """The round ``published`` closes, as its header names it, under the task's strategy."""
    header = published.header
    params = STRATEGIES[strategy].from_params(dict(params or {})).params()
    return RoundContext(
        chain_id=header.chain_id,
        market=header.contract,
        task_id=header.task_id,
        round_number=header.round_number - 1,
        strategy=Strategy.of(strategy),
        trim_per_mille=int(params.get("trim_per_mille", 0)),
    )
