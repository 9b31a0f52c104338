"""Loss and accuracy of a model's weights on the held-out test split or any dataset."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from training.catalogue import forward
from training.datasets import Dataset, load_test
from training.errors import DatasetError, WeightsMismatchError

if TYPE_CHECKING:
    from training.spec import TaskSpec

# Keras clips probabilities the same way in its cross-entropy, so the numbers agree with fit's.
EPSILON = 1e-7
PREDICT_BATCH = 1024


@dataclass(frozen=True)
class Evaluation:
    """Mean cross-entropy loss and accuracy over ``num_examples`` samples."""

    loss: float
    accuracy: float
    num_examples: int

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "accuracy": self.accuracy}


def check_weights(*, spec: TaskSpec, weights: Sequence[np.ndarray]) -> None:
    """Raise WeightsMismatchError unless ``weights`` fit the spec's model."""
    shapes = spec.model_entry.weight_shapes()
    got = [tuple(np.shape(w)) for w in weights]
    if got != shapes:
        raise WeightsMismatchError(
            f"weights do not fit model {spec.model!r}: shapes {got}, expected {shapes}",
            model=spec.model,
        )


def check_data(*, spec: TaskSpec, data: Dataset) -> None:
    """Raise DatasetError unless ``data`` is shaped for the spec's schema and non-empty."""
    schema = spec.schema
    if len(data) == 0 or data.x.shape[1:] != schema.input_shape:
        raise DatasetError(
            source="data",
            reason=f"{len(data)} samples of shape {data.x.shape[1:]}; schema {schema.key!r} "
            f"needs at least one of shape {schema.input_shape}",
        )


def measure(*, model: Any, data: Dataset) -> Evaluation:
    """Evaluate a Keras model as it stands on ``data``."""
    return _tallies(lambda x: [model.predict_on_batch(x)], data, sets=1)[0]


def _tallies(
    outputs: Callable[[np.ndarray], Sequence[Any]], data: Dataset, *, sets: int
) -> list[Evaluation]:
    """Mean cross-entropy and accuracy of each of ``sets`` models, whose class probabilities
    on a batch of ``data`` ``outputs`` gives (one array per model)."""
    losses, hits = [0.0] * sets, [0] * sets
    for start in range(0, len(data), PREDICT_BATCH):
        x, y = data.x[start : start + PREDICT_BATCH], data.y[start : start + PREDICT_BATCH]
        for k, of_set in enumerate(outputs(x)):
            probs = np.asarray(of_set, dtype=np.float64)
            picked = np.clip(probs[np.arange(len(y)), y], EPSILON, 1.0 - EPSILON)
            losses[k] += float(-np.log(picked).sum())
            hits[k] += int((probs.argmax(axis=1) == y).sum())
    return [
        Evaluation(loss=loss / len(data), accuracy=hit / len(data), num_examples=len(data))
        for loss, hit in zip(losses, hits, strict=True)
    ]


def evaluate(
    *, spec: TaskSpec, weights: Sequence[np.ndarray], data: Dataset | None = None
) -> Evaluation:
    """Loss and accuracy of ``weights`` on ``data`` (default: the schema's held-out test split)."""
    return evaluate_many(spec=spec, weight_sets=[weights], data=data)[0]


def evaluate_many(
    *, spec: TaskSpec, weight_sets: Sequence[Sequence[np.ndarray]], data: Dataset | None = None
) -> list[Evaluation]:
    """``evaluate`` of each set of weights, in one pass over ``data``: the same numbers, for
    a fraction of the calls (a round's scoring evaluates dozens of aggregates)."""
    data = load_test(schema=spec.schema) if data is None else data
    for weights in weight_sets:
        check_weights(spec=spec, weights=weights)
    check_data(spec=spec, data=data)
    if not weight_sets:
        return []
    run = forward(spec=spec)
    return _tallies(lambda x: run(weight_sets, x), data, sets=len(weight_sets))
