"""One round of local training on a device's own data, from the round's global weights."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from training.catalogue import compiled_model, minibatch_sgd
from training.datasets import Dataset
from training.evaluate import check_data, check_weights, measure

if TYPE_CHECKING:
    from training.spec import TaskSpec


@dataclass(frozen=True, eq=False)
class LocalResult:
    """A trainer's round: new weights, how many samples made them, loss/accuracy on them."""

    weights: list[np.ndarray]
    num_examples: int
    metrics: dict[str, float]


def train_round(
    *,
    spec: TaskSpec,
    weights: Sequence[np.ndarray],
    data: Dataset,
    round_number: int = 0,
    seed: int | None = None,
) -> LocalResult:
    """Train ``spec.local_epochs`` epochs of minibatch SGD from ``weights`` on ``data``.

    Batch order comes from a numpy generator seeded with (seed or spec.seed, round_number),
    not from TF, so a round is repeatable on the same host and TF build; TF's own kernels
    decide the rest. Metrics are measured on ``data`` after training.
    """
    check_weights(spec=spec, weights=weights)
    check_data(spec=spec, data=data)
    model = compiled_model(spec=spec)
    model.set_weights([np.asarray(w, dtype=np.float32) for w in weights])
    model.optimizer.learning_rate = spec.learning_rate
    rng = np.random.default_rng([spec.seed if seed is None else seed, round_number])
    minibatch_sgd(spec=spec)(
        data.x,
        data.y,
        batches(rng, size=len(data), batch=spec.batch_size, epochs=spec.local_epochs),
    )
    return LocalResult(
        weights=model.get_weights(),
        num_examples=len(data),
        metrics=measure(model=model, data=data).as_dict(),
    )


def batches(rng: np.random.Generator, *, size: int, batch: int, epochs: int) -> np.ndarray:
    """The sample indexes of each minibatch of ``epochs`` passes over ``size`` samples, a
    row each: every epoch a fresh permutation from ``rng``, cut into batches of ``batch``,
    the last of an epoch shorter (padded with -1)."""
    per_epoch = -(-size // batch)
    rows = np.full((epochs, per_epoch * batch), -1, dtype=np.int64)
    for epoch in range(epochs):
        rows[epoch, :size] = rng.permutation(size)
    return rows.reshape(epochs * per_epoch, batch)
