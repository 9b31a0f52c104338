"""A small real federated run on digits: robust strategies survive one poisoned device."""

from __future__ import annotations

import numpy as np
import pytest

from training.aggregation import STRATEGIES, Update
from training.catalogue import initial_weights
from training.evaluate import evaluate
from training.fixedpoint import dequantize, quantize
from training.local import train_round

POISONED = 4  # index of the device that cheats


def poison(*, weights, global_weights, kind):
    if kind == "sign_flip":
        # The update direction reversed and boosted: global - 10 * (trained - global).
        return [g - 10.0 * (w - g) for w, g in zip(weights, global_weights, strict=True)]
    rng = np.random.default_rng(0)
    return [(rng.standard_normal(w.shape) * 1e3).astype(np.float32) for w in weights]


def federate(*, spec, partitions, strategy_key, attack):
    """Rounds as the platform runs them: float training, fixed-point updates and aggregates."""
    strategy = STRATEGIES[strategy_key]()
    global_weights = dequantize(quantize(initial_weights(spec=spec)))
    for round_number in range(spec.rounds):
        updates = []
        for index, data in enumerate(partitions):
            result = train_round(
                spec=spec, weights=global_weights, data=data, round_number=round_number
            )
            weights = result.weights
            if attack and index == POISONED:
                weights = poison(weights=weights, global_weights=global_weights, kind=attack)
            updates.append(
                Update(
                    weights=quantize(weights),
                    num_examples=result.num_examples,
                    update_id=str(index),
                )
            )
        screening = strategy.screen(updates, reference=quantize(global_weights))
        assert not screening.rejected  # the poison is well-shaped: it gets through
        global_weights = dequantize(strategy.aggregate(screening.accepted))
    return evaluate(spec=spec, weights=global_weights).accuracy


def test_fedavg_learns_without_an_attack(spec, partitions):
    assert federate(spec=spec, partitions=partitions, strategy_key="fedavg", attack=None) > 0.85


@pytest.mark.parametrize("attack", ["sign_flip", "huge"])
def test_robust_strategies_keep_accuracy_where_fedavg_does_not(spec, partitions, attack):
    fedavg = federate(spec=spec, partitions=partitions, strategy_key="fedavg", attack=attack)
    for key in ("fedmedian", "fedtrimmedavg"):
        robust = federate(spec=spec, partitions=partitions, strategy_key=key, attack=attack)
        assert robust > 0.8, key
        assert robust > fedavg + 0.3, key
    assert fedavg < 0.5
