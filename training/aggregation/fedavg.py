"""FedAvg: the mean of the trainers' weights weighted by their sample counts."""

from __future__ import annotations

from collections.abc import Sequence

from training.aggregation.base import Strategy, Update
from training.aggregation.functions import WeightedTally, Weights, weighted_mean


class FedAvg(Strategy):
    """Federated averaging, weighted by each update's number of examples.

    McMahan, Moore, Ramage, Hampson and Agüera y Arcas, "Communication-Efficient Learning of
    Deep Networks from Decentralized Data", AISTATS 2017.
    """

    key = "fedavg"
    title = "FedAvg (mean weighted by sample count)"

    def aggregate(self, updates: Sequence[Update]) -> Weights | None:
        """New global weights, or None when no update is usable."""
        if not updates:
            return None
        return weighted_mean([(u.weights, u.num_examples) for u in updates])

    def tally(self, updates: Sequence[Update]) -> WeightedTally:
        return WeightedTally([u.weights for u in updates], [u.num_examples for u in updates])
