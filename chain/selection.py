"""FlexMarket's node selection replayed off chain, and the trainer-position bitmasks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction

from eth_abi import encode as abi_encode
from eth_utils import keccak
from hexbytes import HexBytes

from chain.events import FailureReason, Role
from chain.records import BidInfo, DeviceInfo, SelectionPlan


def selection_seed(*, parent_hash: bytes | str, task_id: int) -> bytes:
    """The seed selectNodes draws in a block whose parent is ``parent_hash``."""
    return keccak(abi_encode(["bytes32", "uint256"], [bytes(HexBytes(parent_hash)), task_id]))


def tie_key(seed: bytes | str, bid_index: int) -> int:
    """How selection orders bids of equal price (per sample): lower key first."""
    return int.from_bytes(
        keccak(abi_encode(["bytes32", "uint256"], [bytes(HexBytes(seed)), bid_index]))
    )


def selection_order(bids: Iterable[BidInfo], *, seed: bytes | str) -> list[int]:
    """The hint selectNodes verifies: every trainer bid index, by price per sample, then
    tie key. Fractions compare exactly like the contract's cross-multiplication."""
    trainer_bids = [b for b in bids if b.role == Role.TRAINER]
    trainer_bids.sort(
        key=lambda b: (Fraction(b.price_per_round_wei, b.samples), tie_key(seed, b.index))
    )
    return [b.index for b in trainer_bids]


def plan_selection(
    *,
    bids: Sequence[BidInfo],
    rounds: int,
    budget_wei: int,
    min_trainers: int,
    max_trainers: int,
    seed: bytes | str,
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
        if aggregator is None or (bid.price_per_round_wei, tie_key(seed, bid.index)) < (
            aggregator.price_per_round_wei,
            tie_key(seed, aggregator.index),
        ):
            aggregator = bid
    if aggregator is None:
        return SelectionPlan(None, (), FailureReason.NO_AGGREGATOR)
    committed = aggregator.price_per_round_wei * rounds
    if committed > budget_wei:
        return SelectionPlan(None, (), FailureReason.AGGREGATOR_OVER_BUDGET)
    by_index = {b.index: b for b in bids}
    chosen: list[int] = []
    for index in selection_order(bids, seed=seed):
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
