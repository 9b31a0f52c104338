"""Local training and evaluation with Keras: a round learns, repeats exactly, and checks inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.catalogue import build_model, import_keras, initial_weights
from training.datasets import Dataset
from training.errors import DatasetError, WeightsMismatchError
from training.evaluate import PREDICT_BATCH, evaluate, evaluate_many, measure
from training.local import train_round
from training.spec import TaskSpec


def raw(weights) -> bytes:
    """The float weights' own bits: training repeats when these do."""
    return b"".join(np.ascontiguousarray(w).tobytes() for w in weights)


def test_a_round_learns_on_its_own_data(spec, partitions):
    start = initial_weights(spec=spec)
    data = partitions[0]
    before = evaluate(spec=spec, weights=start, data=data)
    result = train_round(spec=spec, weights=start, data=data)
    assert result.num_examples == len(data)
    assert set(result.metrics) == {"loss", "accuracy"}
    assert result.metrics["accuracy"] > before.accuracy + 0.3
    assert result.metrics["loss"] < before.loss
    after = evaluate(spec=spec, weights=result.weights, data=data)
    assert after.accuracy == pytest.approx(result.metrics["accuracy"])
    assert [w.shape for w in result.weights] == [w.shape for w in start]
    assert all(w.dtype == np.float32 for w in result.weights)


def test_a_round_repeats_exactly(spec, partitions):
    start = initial_weights(spec=spec)
    first = train_round(spec=spec, weights=start, data=partitions[1], round_number=3)
    second = train_round(spec=spec, weights=start, data=partitions[1], round_number=3)
    other = train_round(spec=spec, weights=start, data=partitions[1], round_number=4)
    assert raw(first.weights) == raw(second.weights)
    assert raw(first.weights) != raw(other.weights)


@pytest.mark.parametrize("model", ["digits-mlp", "digits-cnn"])
def test_a_round_is_keras_minibatch_sgd_step_by_step_to_the_bit(model, partitions):
    """The round runs its batches inside one graph call; the weights are those of Keras's
    own train_on_batch over the same batches in the same order: each epoch a permutation
    from the round's generator, cut into batches, the last one shorter."""
    spec = TaskSpec(model=model, dataset="digits-8x8", rounds=2, local_epochs=3, seed=5)
    data = partitions[1]
    assert len(data) % spec.batch_size  # a short last batch in every epoch
    start = initial_weights(spec=spec)
    fused = train_round(spec=spec, weights=start, data=data, round_number=2)
    keras = import_keras()
    keras_model = build_model(spec=spec)
    keras_model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=spec.learning_rate),
        loss="sparse_categorical_crossentropy",
    )
    keras_model.set_weights(start)
    rng = np.random.default_rng([spec.seed, 2])
    for _ in range(spec.local_epochs):
        order = rng.permutation(len(data))
        for first in range(0, len(data), spec.batch_size):
            chosen = order[first : first + spec.batch_size]
            keras_model.train_on_batch(data.x[chosen], data.y[chosen])
    assert raw(fused.weights) == raw(keras_model.get_weights())
    assert raw(fused.weights) != raw(start)


ROUND_IN_CHILD = """
import sys
from training.catalogue import initial_weights
from training.datasets import load_partition
from training.local import train_round
from training.spec import TaskSpec
from eth_utils import keccak
spec = TaskSpec(model="digits-cnn", dataset="digits-8x8", rounds=2, local_epochs=2, seed=7)
data = load_partition(schema="digits-8x8", index=1, count=5, alpha=1.0, seed=7)
other = load_partition(schema="digits-8x8", index=2, count=5, alpha=1.0, seed=7)
for earlier in range(int(sys.argv[1])):  # a worker that kept running trained other rounds
    train_round(spec=spec, weights=initial_weights(spec=spec), data=other, round_number=earlier)
result = train_round(spec=spec, weights=initial_weights(spec=spec), data=data, round_number=1)
print(keccak(b"".join(w.tobytes() for w in result.weights)).hex())
"""


def test_a_round_repeats_in_another_process():
    """Same host, same settings: a fresh process (a device retraining after a restart) gets
    the weights to the bit that a worker which trained other rounds first got. Other thread
    counts or CPU families may round differently, which is why aggregation, not training, is
    the part anyone can check."""

    def round_in_child(earlier: int) -> str:
        return subprocess.run(
            [sys.executable, "-c", ROUND_IN_CHILD, str(earlier)],
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    restarted = round_in_child(0)
    assert len(restarted) == 64
    assert round_in_child(2) == restarted


def test_trains_from_read_only_weights_without_touching_them(spec, partitions):
    weights = initial_weights(spec=spec)
    before = raw(weights)
    for w in weights:
        w.flags.writeable = False
    train_round(spec=spec, weights=weights, data=partitions[2])
    assert raw(weights) == before


def test_cnn_trains_a_round(partitions):
    spec = TaskSpec(model="digits-cnn", dataset="digits-8x8", rounds=1, learning_rate=0.1)
    result = train_round(spec=spec, weights=initial_weights(spec=spec), data=partitions[0])
    assert [w.shape for w in result.weights] == spec.model_entry.weight_shapes()
    assert np.isfinite(result.metrics["loss"])


def test_wrong_weights_are_refused(spec, partitions):
    weights = initial_weights(spec=spec)[:-1]
    with pytest.raises(WeightsMismatchError, match="do not fit model 'digits-mlp'"):
        train_round(spec=spec, weights=weights, data=partitions[0])
    with pytest.raises(WeightsMismatchError):
        evaluate(spec=spec, weights=weights)


def test_wrong_data_is_refused(spec):
    flat = Dataset(x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(DatasetError, match=r"needs at least one of shape \(8, 8, 1\)"):
        train_round(spec=spec, weights=initial_weights(spec=spec), data=flat)
    empty = Dataset(x=np.zeros((0, 8, 8, 1), np.float32), y=np.zeros(0, np.int64))
    with pytest.raises(DatasetError):
        evaluate(spec=spec, weights=initial_weights(spec=spec), data=empty)


@pytest.mark.parametrize("model", ["digits-mlp", "digits-cnn"])
def test_evaluating_weights_measures_what_a_model_holding_them_measures(model, partitions):
    # Scores and reports evaluate weights without setting them into a model: the numbers
    # are the model's own, over more samples than one batch of predictions.
    spec = TaskSpec(model=model, dataset="digits-8x8", rounds=1, seed=3)
    data = Dataset(
        x=np.concatenate([p.x for p in partitions]), y=np.concatenate([p.y for p in partitions])
    )
    assert len(data) > PREDICT_BATCH
    rng = np.random.default_rng(0)
    start = initial_weights(spec=spec)
    trained = [w + rng.normal(0, 0.05, w.shape).astype(np.float32) for w in start]
    holding = build_model(spec=spec)
    held = []
    for weights in (trained, start, trained):
        holding.set_weights(weights)
        held.append(measure(model=holding, data=data))
        assert evaluate(spec=spec, weights=weights, data=data) == held[-1]
    # Many sets in one call (a round's scoring): each the same numbers, to the bit.
    assert evaluate_many(spec=spec, weight_sets=[trained, start, trained], data=data) == held
    assert evaluate_many(spec=spec, weight_sets=[], data=data) == []


def test_evaluate_defaults_to_the_held_out_split(spec):
    result = evaluate(spec=spec, weights=initial_weights(spec=spec))
    assert result.num_examples == 355
    assert result.accuracy < 0.3  # untrained: near chance
    assert np.log(10) - 0.5 < result.loss < np.log(10) + 0.5
