"""Integer aggregation maths, exact to the bit: by hand, against a plain Python-int oracle, and
the same in another process; and the strategies built over them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.aggregation import STRATEGIES, FedAvg, FedMedian, FedTrimmedAvg, Update, functions
from training.aggregation.functions import (
    MAX_SAMPLES,
    MAX_UPDATES,
    WeightedTally,
    coordinate_median,
    sort_rows,
    sorting_network,
    trimmed_mean,
    weighted_mean,
)
from training.errors import SpecError, WeightsMismatchError

ROOT = Path(__file__).resolve().parents[2]
INT32 = st.integers(-(2**31), 2**31 - 1)


def i32(*values):
    return np.array(values, dtype=np.int32)


# The spec's rules in plain Python ints (// is floor division), one coordinate at a time.


def oracle_fedavg(columns: list[list[int]], weights: list[int]) -> list[int]:
    total = sum(weights)
    return [sum(w * u for w, u in zip(weights, col, strict=True)) // total for col in columns]


def oracle_median(columns: list[list[int]]) -> list[int]:
    out = []
    for col in columns:
        s, k = sorted(col), len(col)
        out.append(s[k // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) // 2)
    return out


def oracle_trimmed(columns: list[list[int]], per_mille: int) -> list[int]:
    out = []
    for col in columns:
        k = len(col)
        t = per_mille * k // 1000
        kept = sorted(col)[t : k - t]
        out.append(sum(kept) // len(kept))
    return out


def test_weighted_mean_by_hand_rounds_down():
    a = [i32(1, 2, -1), i32(10)]
    b = [i32(3, 6, -2), i32(20)]
    # weights 1 and 3: 10/4 = 2.5 -> 2, 20/4 = 5, -7/4 = -1.75 -> -2, 70/4 = 17.5 -> 17
    result = weighted_mean([(a, 1), (b, 3)])
    assert result[0].tolist() == [2, 5, -2]
    assert result[1].tolist() == [17]
    assert [r.dtype for r in result] == [np.int32, np.int32]


def test_extremes_stay_exact_in_int64():
    top, bottom = 2**31 - 1, -(2**31)
    full = [([i32(top, bottom)], MAX_SAMPLES)] * MAX_UPDATES
    assert weighted_mean(full)[0].tolist() == [top, bottom]
    mixed = [([i32(top)], MAX_SAMPLES), ([i32(bottom)], 1)]
    assert weighted_mean(mixed)[0].tolist() == oracle_fedavg([[top, bottom]], [MAX_SAMPLES, 1])
    assert coordinate_median([[i32(top)], [i32(top - 2)]])[0].tolist() == [top - 1]
    assert coordinate_median([[i32(bottom)], [i32(bottom + 1)]])[0].tolist() == [bottom]
    assert trimmed_mean([[i32(top)]] * 5, trim_per_mille=0)[0].tolist() == [top]


def test_weighted_mean_across_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(functions, "CHUNK", 7)
    rng = np.random.default_rng(0)
    layers = [[rng.integers(-(2**31), 2**31, 50, dtype=np.int32)] for _ in range(4)]
    counts = [1, 2, 3, 4]
    columns = np.stack([w[0] for w in layers], axis=1).tolist()
    result = weighted_mean(list(zip(layers, counts, strict=True)))
    assert result[0].tolist() == oracle_fedavg(columns, counts)


def test_weighted_mean_does_not_touch_its_inputs():
    a, b = [i32(1, 2)], [i32(3, 4)]
    weighted_mean([(a, 1), (b, 1)])
    assert a[0].tolist() == [1, 2]
    assert b[0].tolist() == [3, 4]


@pytest.mark.parametrize("counts", [[0, 1], [-1, 2], [1.5, 1], [True, 1], [MAX_SAMPLES + 1, 1]])
def test_weighted_mean_refuses_bad_counts(counts):
    with pytest.raises(ValueError, match="sample counts"):
        weighted_mean([([i32(1)], counts[0]), ([i32(2)], counts[1])])


def test_too_many_or_no_updates_are_refused():
    with pytest.raises(ValueError, match="nothing"):
        weighted_mean([])
    with pytest.raises(ValueError, match="at most 128"):
        coordinate_median([[i32(1)]] * (MAX_UPDATES + 1))


def test_median_and_trimmed_mean_by_hand():
    rows = [[i32(v)] for v in (1, 2, 4, 1000, -7)]
    assert coordinate_median(rows)[0].tolist() == [2]
    assert coordinate_median(rows[:4])[0].tolist() == [3]  # floor((2 + 4) / 2)
    assert coordinate_median([[i32(-3)], [i32(0)]])[0].tolist() == [-2]  # floor(-1.5)
    assert trimmed_mean(rows, trim_per_mille=200)[0].tolist() == [2]  # drop -7, 1000: 7 // 3
    assert trimmed_mean(rows, trim_per_mille=0)[0].tolist() == [200]
    assert trimmed_mean(rows, trim_per_mille=199)[0].tolist() == [200]  # 199 * 5 // 1000 = 0
    assert trimmed_mean(rows, trim_per_mille=499)[0].tolist() == [2]


@pytest.mark.parametrize("value", [-1, 500, 0.2, True, "200"])
def test_trimmed_mean_refuses_bad_trim(value):
    with pytest.raises(ValueError, match="trim_per_mille"):
        trimmed_mean([[i32(1)]], trim_per_mille=value)


columns_of = st.integers(1, 9).flatmap(
    lambda k: st.lists(st.lists(INT32, min_size=k, max_size=k), min_size=1, max_size=6)
)


@settings(max_examples=150, deadline=None)
@given(columns_of, st.data())
def test_property_every_rule_equals_the_python_int_oracle(columns, data):
    k = len(columns[0])
    layers = [[np.array([col[i] for col in columns], dtype=np.int32)] for i in range(k)]
    counts = data.draw(st.lists(st.integers(1, MAX_SAMPLES), min_size=k, max_size=k))
    per_mille = data.draw(st.integers(0, 499))
    assert weighted_mean(list(zip(layers, counts, strict=True)))[0].tolist() == oracle_fedavg(
        columns, counts
    )
    assert coordinate_median(layers)[0].tolist() == oracle_median(columns)
    assert trimmed_mean(layers, trim_per_mille=per_mille)[0].tolist() == oracle_trimmed(
        columns, per_mille
    )


@settings(max_examples=150, deadline=None)
@given(columns_of, st.data())
def test_property_a_tally_grown_in_any_order_is_the_weighted_mean(columns, data):
    """Shapley scoring grows each sampled order's selection one update at a time: every
    selection along the way aggregates as FedAvg of it on its own does, to the bit."""
    k = len(columns[0])
    layers = [[np.array([col[i] for col in columns], dtype=np.int32)] for i in range(k)]
    counts = data.draw(st.lists(st.integers(1, MAX_SAMPLES), min_size=k, max_size=k))
    order = data.draw(st.permutations(range(k)))
    tally, sums = WeightedTally(layers, counts), None
    for size, index in enumerate(order, start=1):
        sums = tally.grow(sums, index)
        chosen = sorted(order[:size])
        expected = oracle_fedavg(
            [[col[i] for i in chosen] for col in columns], [counts[i] for i in chosen]
        )
        assert tally.mean(sums)[0].tolist() == expected
        assert tally.mean(sums)[0].dtype == np.int32
    assert [w[0].tolist() for w in layers] == [[col[i] for col in columns] for i in range(k)]


def test_a_tally_at_the_extremes_and_of_layers_is_the_weighted_mean():
    top, bottom = 2**31 - 1, -(2**31)
    updates = [[i32(top, bottom), i32(top)], [i32(bottom, top), i32(bottom)]] * (MAX_UPDATES // 2)
    tally, sums = WeightedTally(updates, [MAX_SAMPLES] * MAX_UPDATES), None
    for index in range(MAX_UPDATES):
        sums = tally.grow(sums, index)
    pairs = list(zip(updates, [MAX_SAMPLES] * MAX_UPDATES, strict=True))
    assert [a.tolist() for a in tally.mean(sums)] == [a.tolist() for a in weighted_mean(pairs)]


def test_a_tally_refuses_what_weighted_mean_refuses():
    with pytest.raises(ValueError, match="sample counts"):
        WeightedTally([[i32(1)], [i32(2)]], [1, 0])
    with pytest.raises(ValueError, match="2 sample counts for 3 updates"):
        WeightedTally([[i32(1)], [i32(2)], [i32(3)]], [1, 2])
    with pytest.raises(WeightsMismatchError):
        WeightedTally([[i32(1)], [i32(2, 3)]], [1, 1])


@settings(max_examples=40, deadline=None)
@given(count=st.integers(1, 40), width=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_property_sort_rows_matches_numpy(count, width, seed):
    stack = np.random.default_rng(seed).integers(-(2**31), 2**31, (count, width), dtype=np.int32)
    expected = np.sort(stack, axis=0)
    sort_rows(stack)
    np.testing.assert_array_equal(stack, expected)


def test_sorting_network_is_small():
    assert len(sorting_network(2)) == 1
    assert len(sorting_network(10)) <= 45  # fewer than the k(k-1)/2 of a bubble network


CHILD = """
import json, sys
import numpy as np
from training.aggregation import STRATEGIES, Update
rng = np.random.default_rng(11)
updates = [
    Update(weights=[rng.integers(-2**31, 2**31, (300, 70), dtype=np.int32),
                    rng.integers(-2**20, 2**20, 70, dtype=np.int32)],
           num_examples=int(rng.integers(1, 2**24)))
    for _ in range(9)
]
out = {key: [layer.tobytes().hex() for layer in cls().aggregate(updates)]
       for key, cls in STRATEGIES.items()}
json.dump(out, sys.stdout)
"""


def test_same_bits_in_other_processes_whatever_their_threads():
    here: dict = {}
    exec(CHILD.replace("json.dump(out, sys.stdout)", ""), here)
    for threads in ("1", "2"):
        env = {"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "PATH": "/usr/bin"}
        child = subprocess.run(
            [sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert child.returncode == 0, child.stderr
        assert json.loads(child.stdout) == here["out"]


# Strategies


def updates_of(*rows, counts=None):
    counts = counts or [1] * len(rows)
    return [
        Update(weights=[i32(*row)], num_examples=n, update_id=f"u{i}")
        for i, (row, n) in enumerate(zip(rows, counts, strict=True))
    ]


@pytest.mark.parametrize("cls", [FedAvg, FedMedian, FedTrimmedAvg])
def test_nothing_to_aggregate_is_none(cls):
    assert cls().aggregate([]) is None


def test_fedavg_weights_by_sample_count():
    assert FedAvg().aggregate(updates_of([0], [10], counts=[3, 1]))[0].tolist() == [2]


def test_fedmedian_ignores_sample_counts():
    result = FedMedian().aggregate(updates_of([0], [1], [100], counts=[1, 1, 1000]))
    assert result[0].tolist() == [1]


def test_fedtrimmedavg_uses_its_per_mille():
    rows = ([1], [2], [3], [4], [1000])
    assert FedTrimmedAvg(trim_per_mille=200).aggregate(updates_of(*rows))[0].tolist() == [3]
    assert FedTrimmedAvg(trim_per_mille=0).aggregate(updates_of(*rows))[0].tolist() == [202]


def test_registry_keys():
    assert {"fedavg": FedAvg, "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg} == STRATEGIES
    for key, cls in STRATEGIES.items():
        assert cls.key == key
        assert "20" in (cls.__doc__ or "")  # each cites its paper, with the year


def test_from_params():
    assert FedTrimmedAvg.from_params({"trim_per_mille": 100}).params() == {"trim_per_mille": 100}
    assert FedTrimmedAvg.from_params({}).params() == {"trim_per_mille": 200}
    assert FedAvg.from_params({}).params() == {}
    with pytest.raises(SpecError) as exc:
        FedMedian.from_params({"trim_per_mille": 100})
    assert exc.value.field == "aggregation.trim_per_mille"


@pytest.mark.parametrize("value", [500, -1, 0.2, "200", True])
def test_trimmed_avg_refuses_a_bad_per_mille(value):
    with pytest.raises(SpecError) as exc:
        FedTrimmedAvg.from_params({"trim_per_mille": value})
    assert exc.value.field == "aggregation.trim_per_mille"
    with pytest.raises(ValueError, match="trim_per_mille"):
        FedTrimmedAvg(trim_per_mille=value)


def test_the_old_float_trim_ratio_is_refused_with_its_replacement():
    with pytest.raises(SpecError, match="trim_per_mille") as exc:
        FedTrimmedAvg.from_params({"trim_ratio": 0.2})
    assert exc.value.field == "aggregation.trim_ratio"


def test_screen_sets_aside_unusable_updates_with_reasons():
    reference = [i32(0, 0), i32(0)]
    good = Update(weights=[i32(1, 2), i32(3)], num_examples=5, update_id="good")
    wrong_shape = Update(weights=[i32(1, 2, 3), i32(3)], num_examples=5, update_id="shape")
    wrong_dtype = Update(weights=[np.array([1.0, 2.0]), i32(3)], num_examples=5, update_id="dtype")
    missing = Update(weights=[i32(1, 2)], num_examples=5, update_id="missing")
    empty = Update(weights=[i32(1, 2), i32(3)], num_examples=0, update_id="empty")
    liar = Update(weights=[i32(1, 2), i32(3)], num_examples=2**64 - 1, update_id="liar")
    screening = FedAvg().screen(
        [good, wrong_shape, wrong_dtype, missing, empty, liar], reference=reference
    )
    assert screening.accepted == [good]
    reasons = {r.update_id: r.reason for r in screening.rejected}
    assert reasons == {
        "shape": "layer 0 has shape (3,), (2,) expected",
        "dtype": "layer 0 has dtype float64, int32 expected",
        "missing": "has 1 weight arrays, 2 expected",
        "empty": f"num_examples is 0, 1..{MAX_SAMPLES} expected",
        "liar": f"num_examples is {2**64 - 1}, 1..{MAX_SAMPLES} expected",
    }


def test_screen_then_aggregate_skips_the_bad_update():
    reference = [i32(0)]
    updates = [*updates_of([1], [3]), Update(weights=[i32(1, 2)], num_examples=1)]
    screening = FedAvg().screen(updates, reference=reference)
    assert FedAvg().aggregate(screening.accepted)[0].tolist() == [2]
    assert len(screening.rejected) == 1
    assert FedAvg().aggregate(FedAvg().screen(updates[2:], reference=reference).accepted) is None


def test_floats_are_refused_by_the_maths():
    with pytest.raises(WeightsMismatchError, match="int32"):
        weighted_mean([([np.array([1.0, 2.0], np.float32)], 1)])
