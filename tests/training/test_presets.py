"""Defaults that work: each catalogue model's preset, with the task form's defaults, trains a
model of at least 90% accuracy on the bundled digits with the local stack's devices: the
cheapest two of them (the form's minimum), each on its own non-IID slice, aggregated as the
aggregator does it (fixed point, exact weighted mean)."""

from __future__ import annotations

import pytest

from training.aggregation.functions import weighted_mean
from training.catalogue import MODELS, initial_weights
from training.datasets import load_partition
from training.evaluate import evaluate
from training.fixedpoint import dequantize, quantize
from training.local import train_round
from training.spec import TaskSpec

# The local stack's devices (stack/devstack.py): five slices of the digits set, Dirichlet
# alpha 0.5; selection takes the cheapest first, which hold slices 0 and 1.
SLICES, CHEAPEST = 5, (0, 1)
FORM_ROUNDS = 5  # the task form's default


def federated_accuracy(spec: TaskSpec, slices) -> float:
    data = [load_partition(schema=spec.dataset, index=i, count=SLICES, alpha=0.5, seed=0)
            for i in slices]  # fmt: skip
    weights = initial_weights(spec=spec)
    for round_number in range(spec.rounds):
        results = [
            train_round(spec=spec, weights=weights, data=d, round_number=round_number) for d in data
        ]
        weights = dequantize(
            weighted_mean([(quantize(r.weights), r.num_examples) for r in results])
        )
    return evaluate(spec=spec, weights=weights).accuracy


@pytest.mark.parametrize("model", sorted(MODELS))
def test_each_models_preset_reaches_ninety_percent_with_two_local_devices(model):
    preset = MODELS[model].preset
    spec = TaskSpec(
        model=model,
        dataset=MODELS[model].schema,
        rounds=FORM_ROUNDS,
        local_epochs=preset.local_epochs,
        batch_size=preset.batch_size,
        learning_rate=preset.learning_rate,
    )

    assert federated_accuracy(spec, CHEAPEST) >= 0.90


def test_the_old_defaults_fall_short_so_the_check_has_teeth():
    spec = TaskSpec(model="digits-mlp", dataset="digits-8x8", rounds=FORM_ROUNDS)  # epochs 1

    assert federated_accuracy(spec, CHEAPEST) < 0.90
