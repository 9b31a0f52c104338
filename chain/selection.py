"""FlexMarket's node selection replayed off chain, and the trainer-position bitmasks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction

from chain.events import FailureReason, Role
from chain.records import BidInfo, DeviceInfo, SelectionPlan


def selection_order(bids: Iterable[BidInfo]) -> list[int]:
    """The hint selectNodes verifies: every trainer bid index, by price per sample, then
    index. Fractions compare exactly like the contract's cross-multiplication."""
    trainer_bids = [b for b in bids if b.role == Role.TRAINER]
    trainer_bids.sort(key=lambda b: (Fraction(b.price_per_round_wei, b.samples), b.index))
    return [b.index for b in trainer_bids]


def plan_selection(
    *,
    bids: Sequence[BidInfo],
    rounds: int,
    budget_wei: int,
    min_trainers: int,
    max_trainers: int,
    devices: Mapping[str, DeviceInfo] | None = None,
) -> SelectionPlan:
    """The contract's selection rule replayed off chain (for previews and checks).

    ``devices`` gives each bidder's registry entry at selection time; without it every
    bidder counts as active (and aggregator bidders as able to aggregate).
    """

    def active(device: str) -> bool:
        return devices is None or devices[device].active

    def may_aggregate(device: str) -> bool:
        return devices is None or (devices[device].active and devices[device].can_aggregate)

    aggregator: BidInfo | None = None
    for bid in bids:
        if bid.role != Role.AGGREGATOR or not may_aggregate(bid.device):
            continue
        if aggregator is None or bid.price_per_round_wei < aggregator.price_per_round_wei:
            aggregator = bid
    if aggregator is None:
        return SelectionPlan(None, (), FailureReason.NO_AGGREGATOR)
    committed = aggregator.price_per_round_wei * rounds
    if committed > budget_wei:
        return SelectionPlan(None, (), FailureReason.AGGREGATOR_OVER_BUDGET)
    by_index = {b.index: b for b in bids}
    chosen: list[int] = []
    for index in selection_order(bids):
        if len(chosen) == max_trainers:
            break
        bid = by_index[index]
        cost = bid.price_per_round_wei * rounds
        if committed + cost <= budget_wei and active(bid.device):
            committed += cost
            chosen.append(index)
    if len(chosen) < min_trainers:
        return SelectionPlan(None, (), FailureReason.TOO_FEW_TRAINERS)
    return SelectionPlan(aggregator.index, tuple(chosen), None)


def mask_of(positions: Iterable[int]) -> int:
    """The bitmask naming trainer ``positions`` (bit i = position i)."""
    mask = 0
    for p in positions:
        mask |= 1 << p
    return mask


def positions_of(mask: int) -> list[int]:
    """The trainer positions named by ``mask``, ascending."""
    return [i for i in range(mask.bit_length()) if (mask >> i) & 1]
