"""What the chain client returns: mined transactions and the contract's views, as records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from chain.events import (
    ChainEvent,
    DeviceClass,
    DeviceStatus,
    FailureReason,
    Role,
    Strategy,
    TaskState,
)

E = TypeVar("E", bound=ChainEvent)


@dataclass(frozen=True)
class TxResult:
    """A mined, successful transaction and the FlexMarket events it emitted."""

    tx_hash: str
    block_number: int
    block_hash: str
    gas_used: int
    effective_gas_price_wei: int
    events: tuple[ChainEvent, ...]

    @property
    def fee_wei(self) -> int:
        return self.gas_used * self.effective_gas_price_wei

    def all(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]

    def first(self, kind: type[E]) -> E:
        """The first event of ``kind``; LookupError if the transaction emitted none."""
        for event in self.events:
            if isinstance(event, kind):
                return event
        raise LookupError(f"transaction {self.tx_hash} emitted no {kind.__name__}")


@dataclass(frozen=True)
class MinPrices:
    min_trainer_price_wei: int
    min_aggregator_price_wei: int


@dataclass(frozen=True)
class Limits:
    max_trainers: int
    max_rounds: int
    max_bids: int
    max_round_timeout: int
    max_dispute_window: int


@dataclass(frozen=True)
class DeviceInfo:
    status: DeviceStatus
    device_class: DeviceClass
    can_aggregate: bool

    @property
    def active(self) -> bool:
        return self.status == DeviceStatus.ACTIVE


@dataclass(frozen=True)
class TaskInfo:
    """A task as the contract holds it; deadlines are unix times, 0 when not applicable."""

    buyer: str
    state: TaskState
    spec_hash: str
    budget_wei: int
    rounds: int
    min_trainers: int
    max_trainers: int
    bidding_ends: int
    round_timeout: int
    min_trainer_price_wei: int
    min_aggregator_price_wei: int
    bid_count: int
    aggregator: str
    aggregator_price_wei: int
    trainer_count: int
    published_rounds: int
    phase_start: int
    submission_deadline: int
    publish_deadline: int
    sample_cap: int
    trainer_stake_wei: int
    aggregator_bond_wei: int
    stakes_held_wei: int
    dispute_window: int
    strategy: Strategy
    trim_per_mille: int
    dispute_closes_at: int

    def deposit_wei(self, role: Role) -> int:
        """What a bid in ``role`` pays in: the trainer stake or the aggregator bond."""
        return self.aggregator_bond_wei if role == Role.AGGREGATOR else self.trainer_stake_wei

    @property
    def current_round(self) -> int | None:
        """The round trainers train in now (latest published global model), if any."""
        return self.published_rounds - 1 if self.published_rounds else None


@dataclass(frozen=True)
class BidInfo:
    index: int
    device: str
    price_per_round_wei: int
    samples: int
    role: Role


@dataclass(frozen=True)
class SelectionInfo:
    """Who a task selected; ``trainers[i]`` is trainer position i (its bit in the masks),
    ``trainer_samples[i]`` its bid's sample count as the contract weighs its updates (capped
    at the task's sample cap)."""

    aggregator: str
    aggregator_price_wei: int
    trainers: tuple[str, ...]
    trainer_prices_wei: tuple[int, ...]
    trainer_samples: tuple[int, ...]

    @property
    def samples(self) -> dict[str, int]:
        """Each selected trainer's recorded sample count, by checksummed address."""
        return dict(zip(self.trainers, self.trainer_samples, strict=True))


@dataclass(frozen=True)
class RoundInfo:
    """Round r: its global model, the updates submitted in it, and which of them (with
    which scores, empty = unscored) the global model of r+1 aggregated."""

    global_model: str | None
    submitted_mask: int
    aggregated_mask: int
    scores: tuple[int, ...]


@dataclass(frozen=True)
class ModelOrigin:
    """Where a model ID was first used on chain: a task's global model (its author the
    aggregator) or a trainer's update, in which round and block."""

    is_global: bool
    task_id: int
    round: int
    author: str
    block_number: int


@dataclass(frozen=True)
class SelectionPlan:
    """What selectNodes will do with a set of bids: the chosen bid indices or a failure."""

    aggregator_index: int | None
    trainer_indices: tuple[int, ...]
    failure: FailureReason | None
