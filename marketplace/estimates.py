"""What a task should cost, before it is posted: the budget range from the prices the enrolled
devices ask now, and the gas of the whole task; checked by the same rules as posting it."""

from __future__ import annotations

from dataclasses import dataclass

from chain.errors import InvalidRoundsError, InvalidTrainerRangeError
from chain.node import max_fee_per_gas
from chain.records import Limits
from marketplace import contract
from marketplace.models import Bid, Device, Role

# Gas limit assumed for createTask when estimating and checking a buyer's balance: the first
# task on a fresh contract uses about 211k (cold storage), plus the client's 20% margin.
CREATE_TASK_GAS = 260_000
# The gas of each step of a task, as measured by `python -m bench.gas` (docs/contract.md's
# table, rounded up): who pays it is in the comment.
BID_GAS = 108_000  # each device that bids
SELECT_GAS, SELECT_PER_BID_GAS = 50_000, 35_000  # the platform
PUBLISH_GAS = 104_000  # the aggregator, for round 0 and each round
UPDATE_GAS, LATER_UPDATE_GAS = 77_000, 60_000  # each trainer, each round
FINALIZE_GAS, FINALIZE_PER_UPDATE_GAS = 50_000, 12_500  # the platform
WITHDRAW_GAS = 36_000  # each paid party and the buyer


@dataclass(frozen=True)
class CostEstimate:
    """What a task of this shape should cost, from the prices devices ask today.

    ``low_wei`` pays the minimum number of trainers at the cheapest prices asked, ``high_wei``
    the maximum number at the dearest; neither is below ``minimum_wei``, the least the
    contract accepts. A device's price is its latest bid in that role, else the price it
    declared when it enrolled; with fewer prices than trainers, the low end counts the rest at
    the platform minimum, the high end at the dearest price. ``gas_wei`` is what the buyer pays
    to post the task, ``task_gas_wei`` what the whole task burns at most, every party's
    transactions together, both at today's fee.
    """

    rounds: int
    min_trainers: int
    max_trainers: int
    minimum_wei: int
    low_wei: int
    high_wei: int
    gas_units: int
    gas_wei: int
    task_gas_units: int
    task_gas_wei: int
    trainer_prices_wei: tuple[int, ...]
    aggregator_prices_wei: tuple[int, ...]
    min_trainer_price_wei: int
    min_aggregator_price_wei: int

    @property
    def from_devices(self) -> bool:
        return bool(self.trainer_prices_wei or self.aggregator_prices_wei)

    @property
    def basis(self) -> str:
        """Which prices the estimate comes from, in a sentence."""
        trainers, aggregators = len(self.trainer_prices_wei), len(self.aggregator_prices_wei)
        if not self.from_devices:
            return "No device asks a price yet: this uses the platform's minimum prices."
        return (
            f"From the prices {trainers} trainer{'s' if trainers != 1 else ''} and "
            f"{aggregators} aggregator{'s' if aggregators != 1 else ''} ask now."
        )


def task_shape_check(*, limits: Limits, rounds: int, min_trainers: int, max_trainers: int) -> None:
    """The contract's rules on a task's rounds and trainers, checked before any call costs gas.
    Raises InvalidRoundsError, InvalidTrainerRangeError (the contract's own classes)."""
    if not 1 <= rounds <= limits.max_rounds:
        raise InvalidRoundsError(
            f"Rounds must be between 1 and {limits.max_rounds}, not {rounds}.",
            rounds=rounds,
            max_rounds=limits.max_rounds,
        )
    if not 1 <= min_trainers <= max_trainers <= limits.max_trainers:
        raise InvalidTrainerRangeError(
            f"Trainers must be 1 <= minimum <= maximum <= {limits.max_trainers}, "
            f"not {min_trainers} to {max_trainers}.",
            min_trainers=min_trainers,
            max_trainers=max_trainers,
            cap=limits.max_trainers,
        )


def asking_prices(*, floor_trainer: int, floor_aggregator: int) -> tuple[list[int], list[int]]:
    """Each usable device's price per round now, trainers and aggregators apart (never below
    the contract's floors): its latest bid in the role, else what it declared at enrolment."""
    devices = list(Device.objects.exclude(chain_status="revoked"))
    latest: dict[tuple[str, str], int] = {}
    for bid in Bid.objects.filter(device__in=[d.address for d in devices]).order_by(
        "device", "role", "-block_number"
    ):
        latest.setdefault((bid.device, bid.role), int(bid.price_per_round_wei))
    trainers, aggregators = [], []
    for device in devices:
        trainer = latest.get((device.address, Role.TRAINER), device.price_per_round_wei)
        if trainer is not None:
            trainers.append(max(int(trainer), floor_trainer))
        if device.may_aggregate:
            aggregator = latest.get(
                (device.address, Role.AGGREGATOR), device.aggregator_price_per_round_wei
            )
            if aggregator is not None:
                aggregators.append(max(int(aggregator), floor_aggregator))
    return sorted(trainers), sorted(aggregators)


def task_gas_units(*, rounds: int, trainers: int, bidders: int) -> int:
    """Gas every party's transactions of one task take together, at most."""
    return (
        CREATE_TASK_GAS
        + bidders * BID_GAS
        + SELECT_GAS
        + bidders * SELECT_PER_BID_GAS
        + (rounds + 1) * PUBLISH_GAS
        + rounds * (UPDATE_GAS + (trainers - 1) * LATER_UPDATE_GAS)
        + FINALIZE_GAS
        + rounds * trainers * FINALIZE_PER_UPDATE_GAS
        + (trainers + 2) * WITHDRAW_GAS
    )


def cost_estimate(*, rounds: int, min_trainers: int, max_trainers: int) -> CostEstimate:
    """The budget range and gas a task of this shape implies (see CostEstimate). Raises
    InvalidRoundsError, InvalidTrainerRangeError for a shape the contract refuses, and
    ChainUnavailableError."""
    market = contract.market()
    task_shape_check(
        limits=market.limits(), rounds=rounds, min_trainers=min_trainers, max_trainers=max_trainers
    )
    floors = market.min_prices()
    t_floor, a_floor = floors.min_trainer_price_wei, floors.min_aggregator_price_wei
    trainers, aggregators = asking_prices(floor_trainer=t_floor, floor_aggregator=a_floor)
    cheapest = (trainers + [t_floor] * min_trainers)[:min_trainers]
    dear = max(trainers, default=t_floor)
    dearest = (trainers[::-1] + [dear] * max_trainers)[:max_trainers]
    minimum = rounds * (min_trainers * t_floor + a_floor)
    low = rounds * (sum(cheapest) + min(aggregators, default=a_floor))
    high = rounds * (sum(dearest) + max(aggregators, default=a_floor))
    gas_price = max_fee_per_gas(contract.w3())
    whole = task_gas_units(
        rounds=rounds,
        trainers=max_trainers,
        bidders=max(len(trainers) + len(aggregators), max_trainers + 1),
    )
    return CostEstimate(
        rounds=rounds,
        min_trainers=min_trainers,
        max_trainers=max_trainers,
        minimum_wei=minimum,
        low_wei=max(low, minimum),
        high_wei=max(high, low, minimum),
        gas_units=CREATE_TASK_GAS,
        gas_wei=CREATE_TASK_GAS * gas_price,
        task_gas_units=whole,
        task_gas_wei=whole * gas_price,
        trainer_prices_wei=tuple(trainers),
        aggregator_prices_wei=tuple(aggregators),
        min_trainer_price_wei=t_floor,
        min_aggregator_price_wei=a_floor,
    )
