"""The contracts' enums as Python IntEnums, member for member."""

from __future__ import annotations

import enum

# They mirror the Solidity enums member for member (tests compare them with the ABI's
# internal types); IntEnum so that they compare equal to the raw uint8 too.


class DeviceClass(enum.IntEnum):
    CPU = 0
    GPU = 1
    JETSON = 2


class DeviceStatus(enum.IntEnum):
    NONE = 0
    ACTIVE = 1
    REVOKED = 2


class Role(enum.IntEnum):
    TRAINER = 0
    AGGREGATOR = 1


class TaskState(enum.IntEnum):
    NONE = 0
    BIDDING = 1
    RUNNING = 2
    TRAINED = 3
    FINALIZED = 4
    FAILED = 5
    CANCELLED = 6
    ABORTED = 7


class FailureReason(enum.IntEnum):
    NO_AGGREGATOR = 0
    AGGREGATOR_OVER_BUDGET = 1
    TOO_FEW_TRAINERS = 2


class CreditReason(enum.IntEnum):
    TRAINER_PAY = 0
    AGGREGATOR_PAY = 1
    REFUND = 2
    STAKE_RETURNED = 3
    STAKE_SLASHED = 4
    CHALLENGE_BOUNTY = 5


class Strategy(enum.IntEnum):
    """The aggregation strategies the contracts recompute (FlexVerifier.Strategy)."""

    FED_AVG = 0
    FED_MEDIAN = 1
    FED_TRIMMED_AVG = 2

    @classmethod
    def of(cls, name: str) -> Strategy:
        """The strategy a task spec names (``fedavg``, ``fedmedian``, ``fedtrimmedavg``)."""
        for member in cls:
            if member.name.replace("_", "").lower() == name:
                return member
        raise ValueError(f"no fraud proof for strategy {name!r}")


class Verdict(enum.IntEnum):
    """What a challenge showed (FlexVerifier.Verdict)."""

    CORRECT = 0
    WRONG_VALUE = 1
    INVALID_UPDATE = 2
    INVALID_GLOBAL = 3


class Reason(enum.IntEnum):
    """Why an aggregator left a submitted update out of a round (FlexVerifier.Reason); the
    codes are stable (docs/verifiable.md, "Exclusions")."""

    UNSTATED = 0
    NOT_FETCHABLE = 1
    WRONG_KIND = 2
    WRONG_TASK = 3
    WRONG_ROUND = 4
    WRONG_AUTHOR = 5
    WRONG_LAYOUT = 6
    SAMPLES_OUT_OF_RANGE = 7
    COPIED = 8

    @property
    def checkable(self) -> bool:
        """Whether a contest can show the reason false on chain (all but NOT_FETCHABLE)."""
        return self != Reason.NOT_FETCHABLE


ENUMS: dict[str, type[enum.IntEnum]] = {
    e.__name__: e
    for e in (
        DeviceClass,
        DeviceStatus,
        Role,
        TaskState,
        FailureReason,
        CreditReason,
        Strategy,
        Verdict,
        Reason,
    )
}
