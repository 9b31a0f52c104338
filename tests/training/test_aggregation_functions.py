"""Aggregation maths checked by hand on small arrays, and the strategies built over them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.aggregation import STRATEGIES, FedAvg, FedMedian, FedTrimmedAvg, Update, functions
from training.aggregation.functions import (
    coordinate_median,
    sort_rows,
    sorting_network,
    trimmed_mean,
    weighted_mean,
)
from training.errors import SpecError, WeightsMismatchError


def f32(*values):
    return np.array(values, dtype=np.float32)


def test_weighted_mean_by_hand():
    a = [f32(1, 2), f32(10)]
    b = [f32(3, 6), f32(20)]
    # weights 1 and 3: (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5, (10 + 60)/4 = 17.5
    result = weighted_mean([(a, 1), (b, 3)])
    np.testing.assert_allclose(result[0], [2.5, 5.0])
    np.testing.assert_allclose(result[1], [17.5])
    assert [r.dtype for r in result] == [np.float32, np.float32]


def test_weighted_mean_keeps_shapes_and_dtype():
    a = [np.ones((2, 3), dtype=np.float64), np.full((4,), 2.0, dtype=np.float64)]
    b = [np.zeros((2, 3), dtype=np.float64), np.zeros((4,), dtype=np.float64)]
    result = weighted_mean([(a, 1), (b, 1)])
    assert [(r.shape, r.dtype) for r in result] == [((2, 3), np.float64), ((4,), np.float64)]
    np.testing.assert_array_equal(result[0], np.full((2, 3), 0.5))


def test_weighted_mean_float16_accumulates_in_float32():
    updates = [([np.full(3, 1000.0, dtype=np.float16)], 1), ([np.full(3, 1.0, np.float16)], 1)]
    result = weighted_mean(updates)
    assert result[0].dtype == np.float16
    np.testing.assert_allclose(result[0], 500.5, rtol=1e-3)


def test_weighted_mean_across_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(functions, "CHUNK", 7)
    rng = np.random.default_rng(0)
    layers = [[rng.standard_normal(50).astype(np.float32)] for _ in range(4)]
    counts = [1, 2, 3, 4]
    expected = sum(c * w[0].astype(np.float64) for w, c in zip(layers, counts, strict=True)) / 10
    result = weighted_mean(list(zip(layers, counts, strict=True)))
    np.testing.assert_allclose(result[0], expected, rtol=1e-5)


def test_weighted_mean_does_not_touch_its_inputs():
    a, b = [f32(1, 2)], [f32(3, 4)]
    weighted_mean([(a, 1), (b, 1)])
    np.testing.assert_array_equal(a[0], [1, 2])
    np.testing.assert_array_equal(b[0], [3, 4])


def test_weighted_mean_of_one_is_itself():
    a = [f32(1, 2, 3)]
    np.testing.assert_array_equal(weighted_mean([(a, 5)])[0], a[0])


@pytest.mark.parametrize("counts", [[0, 0], [1, -1]])
def test_weighted_mean_refuses_bad_counts(counts):
    with pytest.raises(ValueError, match="non-negative"):
        weighted_mean([([f32(1)], counts[0]), ([f32(2)], counts[1])])


def test_empty_input_is_refused_by_the_maths():
    for fn in (weighted_mean, coordinate_median):
        with pytest.raises(ValueError, match="nothing to aggregate"):
            fn([])


def test_median_by_hand_odd_and_even():
    odd = [[f32(1, 100)], [f32(2, -5)], [f32(30, 0)]]
    np.testing.assert_array_equal(coordinate_median(odd)[0], [2, 0])
    even = [[f32(1, 100)], [f32(2, -5)], [f32(30, 0)], [f32(4, 1)]]
    np.testing.assert_array_equal(coordinate_median(even)[0], [3, 0.5])


def test_median_of_huge_values_does_not_overflow():
    huge = np.finfo(np.float32).max
    result = coordinate_median([[f32(huge)], [f32(huge)]])
    assert result[0][0] == huge


def test_trimmed_mean_by_hand():
    updates = [[f32(1)], [f32(2)], [f32(3)], [f32(4)], [f32(1000)]]
    # k = 5, ratio 0.2 cuts one from each end: mean(2, 3, 4) = 3
    np.testing.assert_array_equal(trimmed_mean(updates, trim_ratio=0.2)[0], [3])
    # ratio 0.1 cuts nothing (floor 0.5 = 0): plain mean = 202
    np.testing.assert_array_equal(trimmed_mean(updates, trim_ratio=0.1)[0], [202])
    # ratio 0.49 cuts two from each end: the median, 3
    np.testing.assert_array_equal(trimmed_mean(updates, trim_ratio=0.49)[0], [3])


@pytest.mark.parametrize("ratio", [-0.1, 0.5, 0.9])
def test_trimmed_mean_refuses_bad_ratio(ratio):
    with pytest.raises(ValueError, match="trim_ratio"):
        trimmed_mean([[f32(1)]], trim_ratio=ratio)


@settings(max_examples=40, deadline=None)
@given(count=st.integers(1, 40), width=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_property_sort_rows_matches_numpy(count, width, seed):
    stack = np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32)
    expected = np.sort(stack, axis=0)
    sort_rows(stack)
    np.testing.assert_array_equal(stack, expected)


def test_sorting_network_is_small():
    assert len(sorting_network(2)) == 1
    assert len(sorting_network(10)) <= 45  # fewer than the k(k-1)/2 of a bubble network


@settings(max_examples=30, deadline=None)
@given(count=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_property_robust_functions_match_numpy(count, seed):
    rng = np.random.default_rng(seed)
    layers = [[rng.standard_normal((3, 4)).astype(np.float32)] for _ in range(count)]
    stacked = np.stack([w[0] for w in layers]).astype(np.float64)
    np.testing.assert_allclose(coordinate_median(layers)[0], np.median(stacked, axis=0), 1e-6)
    cut = int(0.25 * count)
    kept = np.sort(stacked, axis=0)[cut : count - cut]
    np.testing.assert_allclose(
        trimmed_mean(layers, trim_ratio=0.25)[0], kept.mean(axis=0), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("other", "words"),
    [
        ([f32(1, 2)], "has 1 weight arrays, 2 expected"),
        ([f32(1, 2, 3), f32(1)], "layer 0 has shape (3,), (2,) expected"),
        ([np.array([1, 2], dtype=np.float64), f32(1)], "layer 0 has dtype float64"),
    ],
)
@pytest.mark.parametrize(
    "fn",
    [
        lambda ws: weighted_mean([(w, 1) for w in ws]),
        coordinate_median,
        lambda ws: trimmed_mean(ws, trim_ratio=0.2),
    ],
)
def test_mismatched_updates_are_refused(fn, other, words):
    first = [f32(1, 2), f32(3)]
    with pytest.raises(WeightsMismatchError) as exc:
        fn([first, other])
    assert words in str(exc.value)
    assert exc.value.position == 1
    assert exc.value.code == "weights_mismatch"


def test_integer_weights_are_refused():
    with pytest.raises(WeightsMismatchError, match="floating-point"):
        weighted_mean([([np.array([1, 2])], 1)])


# Strategies


def updates_of(*rows, counts=None):
    counts = counts or [1] * len(rows)
    return [
        Update(weights=[f32(*row)], num_examples=n, update_id=f"u{i}")
        for i, (row, n) in enumerate(zip(rows, counts, strict=True))
    ]


@pytest.mark.parametrize("cls", [FedAvg, FedMedian, FedTrimmedAvg])
def test_nothing_to_aggregate_is_none(cls):
    assert cls().aggregate([]) is None


def test_fedavg_weights_by_sample_count():
    result = FedAvg().aggregate(updates_of([0.0], [10.0], counts=[3, 1]))
    np.testing.assert_allclose(result[0], [2.5])


def test_fedmedian_ignores_sample_counts():
    result = FedMedian().aggregate(updates_of([0.0], [1.0], [100.0], counts=[1, 1, 1000]))
    np.testing.assert_array_equal(result[0], [1.0])


def test_fedtrimmedavg_uses_its_ratio():
    rows = ([1.0], [2.0], [3.0], [4.0], [1000.0])
    np.testing.assert_array_equal(
        FedTrimmedAvg(trim_ratio=0.2).aggregate(updates_of(*rows))[0], [3]
    )
    np.testing.assert_array_equal(
        FedTrimmedAvg(trim_ratio=0.0).aggregate(updates_of(*rows))[0], [202]
    )


def test_registry_keys():
    assert {"fedavg": FedAvg, "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg} == STRATEGIES
    for key, cls in STRATEGIES.items():
        assert cls.key == key
        assert "20" in (cls.__doc__ or "")  # each cites its paper, with the year


def test_from_params():
    assert FedTrimmedAvg.from_params({"trim_ratio": 0.1}).params() == {"trim_ratio": 0.1}
    assert FedTrimmedAvg.from_params({}).params() == {"trim_ratio": 0.2}
    assert FedAvg.from_params({}).params() == {}
    with pytest.raises(SpecError) as exc:
        FedMedian.from_params({"trim_ratio": 0.1})
    assert exc.value.field == "aggregation.trim_ratio"


def test_trimmed_avg_refuses_bad_ratio():
    with pytest.raises(ValueError, match="trim_ratio"):
        FedTrimmedAvg(trim_ratio=0.5)


def test_screen_sets_aside_unusable_updates_with_reasons():
    reference = [f32(0, 0), f32(0)]
    good = Update(weights=[f32(1, 2), f32(3)], num_examples=5, update_id="good")
    wrong_shape = Update(weights=[f32(1, 2, 3), f32(3)], num_examples=5, update_id="shape")
    wrong_dtype = Update(weights=[np.array([1.0, 2.0]), f32(3)], num_examples=5, update_id="dtype")
    missing = Update(weights=[f32(1, 2)], num_examples=5, update_id="missing")
    nan = Update(weights=[f32(1, np.nan), f32(3)], num_examples=5, update_id="nan")
    inf = Update(weights=[f32(1, 2), f32(np.inf)], num_examples=5, update_id="inf")
    empty = Update(weights=[f32(1, 2), f32(3)], num_examples=0, update_id="empty")
    screening = FedAvg().screen(
        [good, wrong_shape, wrong_dtype, missing, nan, inf, empty], reference=reference
    )
    assert screening.accepted == [good]
    reasons = {r.update_id: r.reason for r in screening.rejected}
    assert reasons == {
        "shape": "layer 0 has shape (3,), (2,) expected",
        "dtype": "layer 0 has dtype float64, float32 expected",
        "missing": "has 1 weight arrays, 2 expected",
        "nan": "layer 0 holds NaN or infinite values",
        "inf": "layer 1 holds NaN or infinite values",
        "empty": "num_examples is 0, at least 1 expected",
    }


def test_screen_then_aggregate_skips_the_bad_update():
    reference = [f32(0)]
    updates = [*updates_of([1.0], [3.0]), Update(weights=[f32(1, 2)], num_examples=1)]
    screening = FedAvg().screen(updates, reference=reference)
    np.testing.assert_array_equal(FedAvg().aggregate(screening.accepted)[0], [2.0])
    assert len(screening.rejected) == 1
    assert FedAvg().aggregate(FedAvg().screen(updates[2:], reference=reference).accepted) is None
