"""The update a trainer hands in and the Strategy interface every aggregation rule implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np

from training.aggregation.functions import MAX_SAMPLES, WeightedTally, Weights, weight_mismatch
from training.errors import SpecError


@dataclass(frozen=True, eq=False)
class Update:
    """One trainer's result for a round: its int32 fixed-point weights, how many samples made
    them (as the contract records it), and an ID (the update's model ID as 0x hex, or any label
    the caller uses to report on it)."""

    weights: Weights
    num_examples: int
    update_id: str = ""


# The deterministic screening rules, by stable name: what an aggregator states on chain
# when a rule leaves an update out (docs/verifiable.md, "Exclusions").
RULE_LAYOUT = "layout"  # layers, shapes or dtype differ from the global model's
RULE_SAMPLES = "samples"  # the recorded sample count is outside 1..MAX_SAMPLES
RULE_COPY = "copy"  # the values repeat a known model's or an earlier update's


@dataclass(frozen=True)
class Rejection:
    """An update left out of aggregation, why, the rule that left it out and, for a copy,
    the ID of the model it repeats."""

    update_id: str
    reason: str
    rule: str = ""
    evidence: str = ""


@dataclass(frozen=True)
class Screening:
    """Updates split into those fit to aggregate and those rejected, with reasons."""

    accepted: list[Update] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


class Strategy(ABC):
    """An aggregation rule: new global weights from a round's updates.

    ``aggregate`` is pure maths over updates that fit together; it raises WeightsMismatchError
    otherwise. Untrusted updates go through ``screen`` first, which sets aside (and reports)
    each update that cannot be used, so one bad trainer does not stop the round.
    """

    key: ClassVar[str]
    title: ClassVar[str]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Self:
        """The strategy for a spec's aggregation parameters; raises SpecError naming a bad one."""
        if params:
            name = next(iter(params))
            raise SpecError(field=f"aggregation.{name}", reason=f"{cls.key} takes no {name!r}")
        return cls()

    def params(self) -> dict[str, Any]:
        """The parameters as they appear in a task spec (all of them, defaults included)."""
        return {}

    @abstractmethod
    def aggregate(self, updates: Sequence[Update]) -> Weights | None:
        """New global weights, or None when no update is usable."""

    def tally(self, updates: Sequence[Update]) -> WeightedTally | None:
        """A running form of ``aggregate`` over selections of ``updates`` that grow one update
        at a time, where the rule has one; None: each selection is aggregated afresh."""
        return None

    def screen(self, updates: Sequence[Update], *, reference: Sequence[np.ndarray]) -> Screening:
        """Split ``updates`` into usable ones and rejections (layers, shapes, dtype, count)."""
        screening = Screening()
        for update in updates:
            reason, rule = weight_mismatch(update.weights, reference=reference), RULE_LAYOUT
            if reason is None and not 1 <= update.num_examples <= MAX_SAMPLES:
                reason = f"num_examples is {update.num_examples}, 1..{MAX_SAMPLES} expected"
                rule = RULE_SAMPLES
            if reason is None:
                screening.accepted.append(update)
            else:
                screening.rejected.append(
                    Rejection(update_id=update.update_id, reason=reason, rule=rule)
                )
        return screening
