"""Aggregation strategies, Flower-style: pure numpy maths in functions, small classes over them."""

from training.aggregation.base import Rejection, Screening, Strategy, Update
from training.aggregation.fedavg import FedAvg
from training.aggregation.functions import Weights
from training.aggregation.median import FedMedian, FedTrimmedAvg

STRATEGIES: dict[str, type[Strategy]] = {s.key: s for s in (FedAvg, FedMedian, FedTrimmedAvg)}

__all__ = [
    "STRATEGIES",
    "FedAvg",
    "FedMedian",
    "FedTrimmedAvg",
    "Rejection",
    "Screening",
    "Strategy",
    "Update",
    "Weights",
]
