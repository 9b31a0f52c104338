"""Byzantine-robust strategies: coordinate-wise median and coordinate-wise trimmed mean."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Self

from training.aggregation.base import Strategy, Update
from training.aggregation.functions import (
    Weights,
    check_trim,
    coordinate_median,
    trimmed_mean,
)
from training.errors import SpecError


class FedMedian(Strategy):
    """Coordinate-wise median of the updates; sample counts are ignored, so a trainer cannot
    buy influence by claiming many examples.

    Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", ICML 2018.
    """

    key = "fedmedian"
    title = "FedMedian (coordinate-wise median)"

    def aggregate(self, updates: Sequence[Update]) -> Weights | None:
        """New global weights, or None when no update is usable."""
        if not updates:
            return None
        return coordinate_median([u.weights for u in updates])


class FedTrimmedAvg(Strategy):
    """Coordinate-wise trimmed mean: per coordinate, drop the ``floor(trim_per_mille * k /
    1000)`` largest and smallest values and average the rest (unweighted).

    Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", ICML 2018.
    """

    key = "fedtrimmedavg"
    title = "FedTrimmedAvg (coordinate-wise trimmed mean)"
    default_trim_per_mille = 200

    def __init__(self, *, trim_per_mille: int = default_trim_per_mille) -> None:
        check_trim(trim_per_mille)
        self.trim_per_mille = trim_per_mille

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Self:
        """The strategy for a spec's aggregation parameters; raises SpecError naming a bad one."""
        for name in params:
            if name == "trim_ratio":
                raise SpecError(
                    field="aggregation.trim_ratio",
                    reason="replaced by trim_per_mille, an integer 0..499 (0.2 is 200)",
                )
            if name != "trim_per_mille":
                raise SpecError(field=f"aggregation.{name}", reason=f"{cls.key} takes no {name!r}")
        value = params.get("trim_per_mille", cls.default_trim_per_mille)
        try:
            check_trim(value)
        except ValueError:
            raise SpecError(
                field="aggregation.trim_per_mille",
                reason=f"must be an integer in 0..499 (per mille cut at each end), got {value!r}",
            ) from None
        return cls(trim_per_mille=value)

    def params(self) -> dict[str, Any]:
        """The parameters as they appear in a task spec (all of them, defaults included)."""
        return {"trim_per_mille": self.trim_per_mille}

    def aggregate(self, updates: Sequence[Update]) -> Weights | None:
        """New global weights, or None when no update is usable."""
        if not updates:
            return None
        return trimmed_mean([u.weights for u in updates], trim_per_mille=self.trim_per_mille)
