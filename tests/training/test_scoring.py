"""Contribution scores on a real round of digits: honest updates earn by their Shapley value
(non-IID ones too), noise earns the floor, copies of known models are set aside, and the
scores are the same in another process."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from training import scoring
from training.aggregation import STRATEGIES, Update
from training.catalogue import initial_weights
from training.datasets import Dataset, load_test
from training.evaluate import evaluate, evaluate_many
from training.fixedpoint import dequantize, quantize
from training.local import train_round
from training.scoring import (
    FLOOR,
    FULL_SCALE,
    fedavg_weight,
    junk,
    quantize_gains,
    shapley,
    values_digest,
)

ROOT = Path(__file__).resolve().parents[2]


def noise(count: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.random((count, 8, 8, 1), dtype=np.float32)
    return Dataset(x=x, y=rng.integers(0, 10, count))


def round_updates(spec, partitions) -> tuple[list, list[Update]]:
    """Round 1 of a task: three honest trainers and one whose data is noise."""
    start = dequantize(quantize(initial_weights(spec=spec)))
    # One warm-up round, so that the round scored starts from a model that already learnt.
    warm = STRATEGIES["fedavg"]().aggregate(
        [
            Update(
                weights=quantize(train_round(spec=spec, weights=start, data=d).weights),
                num_examples=len(d),
            )
            for d in partitions[:3]
        ]
    )
    updates = []
    sources = [*partitions[:3], noise(len(partitions[0]), seed=1)]
    for index, data in enumerate(sources):
        trained = train_round(spec=spec, weights=dequantize(warm), data=data, round_number=1)
        updates.append(
            Update(weights=quantize(trained.weights), num_examples=len(data), update_id=f"u{index}")
        )
    return warm, updates


def loss_on_test(spec):
    data = load_test(schema=spec.schema)
    return lambda weights: evaluate(spec=spec, weights=dequantize(weights), data=data).loss


def losses_on_test(spec):
    """The aggregator's batched losses (worker.aggregator._scores) on the test split."""
    data = load_test(schema=spec.schema)
    return lambda sets: [
        e.loss
        for e in evaluate_many(spec=spec, weight_sets=[dequantize(w) for w in sets], data=data)
    ]


def one_at_a_time(loss_of):
    return lambda sets: [loss_of(w) for w in sets]


def test_weighing_updates_by_score_keeps_noise_out_of_the_model(spec, partitions):
    """The round's aggregate with each update weighted by samples and score (as the
    aggregator publishes it) is better on the test set than the plain FedAvg of the same
    updates, which takes the noise in at its sample count."""
    reference, updates = round_updates(spec, partitions)
    loss = loss_on_test(spec)
    scored = shapley(
        updates, strategy=STRATEGIES["fedavg"](), reference=reference, losses_of=one_at_a_time(loss)
    )
    by_score = STRATEGIES["fedavg"]().aggregate(
        [
            Update(
                weights=u.weights,
                num_examples=fedavg_weight(u.num_examples, scored.scores[u.update_id]),
            )
            for u in updates
        ]
    )
    by_samples = STRATEGIES["fedavg"]().aggregate(updates)
    assert loss(by_score) < loss(by_samples)


@given(st.integers(1, 2**24), st.integers(FLOOR, FULL_SCALE))
def test_a_scored_update_weighs_at_most_its_samples_and_never_zero(samples, score):
    weight = fedavg_weight(samples, score)
    assert isinstance(weight, int)
    assert 1 <= weight <= samples
    assert weight == max(1, samples * score // FULL_SCALE)
    assert fedavg_weight(samples, FULL_SCALE) == samples
    assert fedavg_weight(samples, None) == samples  # an unscored round: samples alone
    # A higher score never weighs less.
    assert fedavg_weight(samples, min(score + 1, FULL_SCALE)) >= weight


@pytest.mark.parametrize("strategy_key", ["fedavg", "fedtrimmedavg"])
def test_honest_updates_outscore_noise_which_gets_the_floor(spec, partitions, strategy_key):
    reference, updates = round_updates(spec, partitions)
    scored = shapley(
        updates,
        strategy=STRATEGIES[strategy_key](),
        reference=reference,
        losses_of=losses_on_test(spec),
    )
    honest = [scored.scores[f"u{i}"] for i in range(3)]
    assert scored.scores["u3"] == FLOOR
    assert scored.gains["u3"] <= 0
    assert max(honest) == FULL_SCALE
    assert all(s > FLOOR for s in honest)
    assert all(0 <= s <= FULL_SCALE for s in scored.scores.values())


def test_scores_are_the_same_in_another_process(spec, partitions, tmp_path):
    reference, updates = round_updates(spec, partitions)
    here = shapley(
        updates,
        strategy=STRATEGIES["fedavg"](),
        reference=reference,
        losses_of=losses_on_test(spec),
    )
    np.savez(tmp_path / "round.npz", *reference, *(w for u in updates for w in u.weights))
    layers = len(reference)
    script = f"""
import json, numpy as np
from training import scoring
from training.aggregation import STRATEGIES, Update
from training.datasets import load_test
from training.evaluate import evaluate_many
from training.fixedpoint import dequantize
from training.scoring import shapley
from training.spec import TaskSpec
spec = TaskSpec.from_json({spec.as_json()!r})
with np.load({str(tmp_path / "round.npz")!r}) as f:
    arrays = [f[f"arr_{{i}}"] for i in range(len(f.files))]
reference, rest = arrays[:{layers}], arrays[{layers}:]
updates = [Update(weights=rest[i:i + {layers}], num_examples=n, update_id=f"u{{k}}")
           for k, (i, n) in enumerate(zip(range(0, len(rest), {layers}),
                                          {[u.num_examples for u in updates]!r}))]
data = load_test(schema=spec.schema)
scored = shapley(updates, strategy=STRATEGIES["fedavg"](), reference=reference,
    losses_of=lambda sets: [e.loss for e in evaluate_many(
        spec=spec, weight_sets=[dequantize(w) for w in sets], data=data)])
print(json.dumps(scored.scores))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == here.scores


def test_copies_of_known_models_and_of_each_other_are_set_aside(spec, partitions):
    reference, updates = round_updates(spec, partitions)
    global_copy = Update(weights=[w.copy() for w in reference], num_examples=300, update_id="g")
    echo = Update(weights=[w.copy() for w in updates[0].weights], num_examples=9, update_id="e")
    old = Update(weights=quantize(initial_weights(spec=spec)), num_examples=5, update_id="old")
    known = {
        values_digest(reference): "round 1's global model",
        values_digest(quantize(initial_weights(spec=spec))): "round 0's global model",
    }
    split = junk([updates[0], global_copy, echo, old, updates[1]], known=known)
    assert [u.update_id for u in split.kept] == ["u0", "u1"]
    assert {r.update_id: r.reason for r in split.rejected} == {
        "g": "a copy of round 1's global model",
        "e": "a copy of update u0",
        "old": "a copy of round 0's global model",
    }
    # One flipped value is another model.
    tweaked = [w.copy() for w in reference]
    tweaked[0].reshape(-1)[0] += 1
    assert junk([Update(weights=tweaked, num_examples=1, update_id="t")], known=known).kept


def test_quantized_scores_keep_valid_updates_above_zero():
    assert quantize_gains([0.2, 0.1, 0.0, -0.3]) == [
        FULL_SCALE,
        FLOOR + (FULL_SCALE - FLOOR) // 2,
        FLOOR,
        FLOOR,
    ]
    # Nobody improves the model: the round is shared equally, never withheld.
    assert quantize_gains([-0.1, -0.2]) == [FLOOR, FLOOR]
    assert quantize_gains([1e-300, 1.0])[0] == FLOOR
    assert quantize_gains([]) == []


def test_a_single_update_is_scored_against_the_round_s_global_model(spec, partitions):
    reference, updates = round_updates(spec, partitions)
    loss_of = loss_on_test(spec)
    scored = shapley(
        updates[:1],
        strategy=STRATEGIES["fedavg"](),
        reference=reference,
        losses_of=one_at_a_time(loss_of),
    )
    assert scored.gains["u0"] == pytest.approx(loss_of(reference) - loss_of(updates[0].weights))
    assert scored.scores == {"u0": FULL_SCALE if scored.gains["u0"] > 0 else FLOOR}


def test_many_updates_are_scored_by_sampled_orders_the_same_every_time():
    # A one-value model: honest updates sit around the target, two are far off.
    rng = np.random.default_rng(3)
    target = 1 << 16
    values = [int(target + d) for d in rng.integers(-3000, 3000, scoring.EXACT_MAX + 2)]
    values[4] = values[9] = target * 40
    updates = [
        Update(weights=[np.array([v], dtype=np.int32)], num_examples=10, update_id=f"u{i}")
        for i, v in enumerate(values)
    ]
    reference = [np.array([0], dtype=np.int32)]

    def loss_of(weights):
        return abs(float(weights[0][0]) - target) / target

    runs = [
        shapley(
            updates,
            strategy=STRATEGIES["fedavg"](),
            reference=reference,
            losses_of=one_at_a_time(loss_of),
            seed=(5, 1, 2),
        )
        for _ in range(2)
    ]
    assert runs[0].scores == runs[1].scores
    assert runs[0].evaluations <= scoring.PERMUTATIONS * len(updates) + 1
    assert runs[0].scores["u4"] == runs[0].scores["u9"] == FLOOR
    assert all(s > FLOOR for k, s in runs[0].scores.items() if k not in ("u4", "u9"))
    other = shapley(
        updates,
        strategy=STRATEGIES["fedavg"](),
        reference=reference,
        losses_of=one_at_a_time(loss_of),
        seed=(6,),
    )
    assert other.scores != runs[0].scores  # the orders come from the seed


@pytest.mark.parametrize("strategy_key", ["fedavg", "fedmedian"])
def test_sampled_orders_are_walked_together_with_the_scores_of_one_walk_at_a_time(
    monkeypatch, strategy_key
):
    """Beyond EXACT_MAX the sampled orders take a step together, each step's new subsets
    evaluated in one batch: a round of many updates costs about as many evaluation calls as
    it has updates, not one per subset. Under FedAvg each walk's aggregate grows from its last
    by one update (its tally) instead of being made afresh. Every score is what walking one
    order at a time, aggregating and evaluating one subset per call, gives."""
    rng = np.random.default_rng(11)
    target = 1 << 16
    count = 3 * scoring.EXACT_MAX
    updates = [
        Update(
            weights=[np.array([target + int(d), int(d)], dtype=np.int32)],
            num_examples=int(rng.integers(1, 50)),
            update_id=f"u{i}",
        )
        for i, d in enumerate(rng.integers(-30000, 30000, count))
    ]
    reference = [np.array([0, 0], dtype=np.int32)]
    calls, made = [], []

    class Counted(STRATEGIES[strategy_key]):
        def aggregate(self, chosen):
            made.append(len(chosen))
            return super().aggregate(chosen)

    def losses_of(sets):
        calls.append(len(sets))
        return [abs(float(w[0][0]) - target) / target + abs(float(w[0][1])) for w in sets]

    def scored():
        calls.clear()
        made.clear()
        return shapley(
            updates, strategy=Counted(), reference=reference, losses_of=losses_of, seed=(2, 7)
        )

    together = scored()
    assert together.evaluations == sum(calls) - 1  # the reference's loss, then each subset once
    assert len(calls) <= count + 2 < together.evaluations
    # FedAvg aggregates only the whole round afresh; the median, every subset.
    assert len(made) == (1 if strategy_key == "fedavg" else together.evaluations)
    # Walking one order at a time (each subset aggregated and evaluated when first needed)
    # evaluates the same subsets, one per call, and finds the same gains.
    monkeypatch.setattr(scoring, "_walk_together", lambda *args, **kwargs: None)
    alone = scored()
    assert set(calls) == {1}
    assert len(made) == together.evaluations
    assert alone == together
    # So does walking together one subset per call, with no tally (a model too large for
    # one in memory per order).
    monkeypatch.undo()
    monkeypatch.setattr(scoring, "BATCH_VALUES", 1)
    assert scored() == together
    assert set(calls) == {1}
    assert len(made) == together.evaluations


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), max_size=40))
def test_quantized_scores_are_bounded_ordered_and_never_zero(gains):
    scores = quantize_gains(gains)
    assert len(scores) == len(gains)
    assert all(FLOOR <= s <= FULL_SCALE for s in scores)
    for (g1, s1), (g2, s2) in itertools.combinations(zip(gains, scores, strict=True), 2):
        if g1 >= g2:
            assert s1 >= s2
        if g1 <= g2:
            assert s1 <= s2
    if any(g > 0 for g in gains):
        assert max(scores) == FULL_SCALE


def test_scores_from_batched_losses_are_those_of_one_evaluation_at_a_time(
    spec, partitions, monkeypatch
):
    """The aggregator hands a round's subsets to the evaluation in batches, as many as
    BATCH_VALUES allows; every gain, and so every score, is what evaluating each aggregate
    on its own gives."""
    reference, updates = round_updates(spec, partitions)
    fedavg = STRATEGIES["fedavg"]()
    losses, sizes = losses_on_test(spec), []

    def recorded(sets):
        sizes.append(len(sets))
        return losses(sets)

    alone = shapley(
        updates, strategy=fedavg, reference=reference, losses_of=one_at_a_time(loss_on_test(spec))
    )
    batched = shapley(updates, strategy=fedavg, reference=reference, losses_of=recorded)
    assert batched == alone
    assert batched.evaluations == sum(sizes) - 1 == 2 ** len(updates) - 1
    assert max(sizes) == 2 ** len(updates) - 1  # every subset at once
    # A model too large for that many copies at once: batches of three.
    sizes.clear()
    values = sum(w.size for w in reference)
    monkeypatch.setattr(scoring, "BATCH_VALUES", 3 * values)
    assert shapley(updates, strategy=fedavg, reference=reference, losses_of=recorded) == alone
    assert max(sizes) == 3
