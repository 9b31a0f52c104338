"""Byzantine-robust strategies: coordinate-wise median and coordinate-wise trimmed mean."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Self

from training.aggregation.base import Strategy, Update
from training.aggregation.functions import Weights, coordinate_median, trimmed_mean
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
    """Coordinate-wise trimmed mean: per coordinate, drop the floor(trim_ratio * k) largest and
    smallest values and average the rest (unweighted).

    Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", ICML 2018.
    """

    key = "fedtrimmedavg"
    title = "FedTrimmedAvg (coordinate-wise trimmed mean)"
    default_trim_ratio = 0.2

    def __init__(self, *, trim_ratio: float = default_trim_ratio) -> None:
        if not 0.0 <= trim_ratio < 0.5:
            raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
        self.trim_ratio = trim_ratio

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Self:
        """The strategy for a spec's aggregation parameters; raises SpecError naming a bad one."""
        for name in params:
            if name != "trim_ratio":
                raise SpecError(field=f"aggregation.{name}", reason=f"{cls.key} takes no {name!r}")
        ratio = params.get("trim_ratio", cls.default_trim_ratio)
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, int | float)
            or not math.isfinite(ratio)
            or not 0.0 <= ratio < 0.5
        ):
            raise SpecError(
                field="aggregation.trim_ratio",
                reason=f"must be a number in [0, 0.5), got {ratio!r}",
            )
        return cls(trim_ratio=float(ratio))

    def params(self) -> dict[str, Any]:
        """The parameters as they appear in a task spec (all of them, defaults included)."""
        return {"trim_ratio": self.trim_ratio}

    def aggregate(self, updates: Sequence[Update]) -> Weights | None:
        """New global weights, or None when no update is usable."""
        if not updates:
            return None
        return trimmed_mean([u.weights for u in updates], trim_ratio=self.trim_ratio)
