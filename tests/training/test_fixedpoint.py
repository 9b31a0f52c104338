"""Fixed point: float32 weights to int32 exactly by the spec's rule, and back."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from training.errors import NonFiniteWeightsError
from training.fixedpoint import INT32_MAX, INT32_MIN, SCALE_BITS, dequantize, quantize

ONE = 1 << SCALE_BITS


def oracle(x: float, scale_bits: int = SCALE_BITS) -> int:
    """The spec's rule in plain Python: Fraction is exact, round() on it rounds half to even."""
    return max(INT32_MIN, min(INT32_MAX, round(Fraction(x) * (1 << scale_bits))))


def test_by_hand():
    x = np.array([1.0, -1.0, 0.5, 1.5 / ONE, 2.5 / ONE, -0.5 / ONE, 1e9, -1e9], np.float32)
    assert quantize([x])[0].tolist() == [ONE, -ONE, ONE // 2, 2, 2, 0, INT32_MAX, INT32_MIN]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_naming_the_layer(bad):
    with pytest.raises(NonFiniteWeightsError) as exc:
        quantize([np.zeros(2, np.float32), np.array([0.0, bad], np.float32)])
    assert exc.value.layer == 1
    assert exc.value.code == "weights_non_finite"


floats32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 40), elements=floats32), st.integers(0, 30))
def test_property_quantize_matches_the_python_oracle(x, scale_bits):
    got = quantize([x], scale_bits=scale_bits)[0]
    assert got.dtype == np.int32
    assert got.tolist() == [oracle(float(v), scale_bits) for v in x]


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.int32, st.integers(1, 40)))
def test_property_dequantize_is_one_correct_rounding(q):
    got = dequantize([q])[0]
    assert got.dtype == np.float32
    # float64 holds q / 2^F exactly, so one rounding to float32 is the correctly rounded value.
    assert got.tolist() == [float(np.float32(int(v) / ONE)) for v in q]


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 40), elements=st.floats(-30000, 30000, width=32)))
def test_property_round_trip_error_is_at_most_half_a_step(x):
    back = dequantize(quantize([x]))[0].astype(np.float64)
    assert np.all(np.abs(back - x) <= 0.5 / ONE + np.abs(x) * 2.0**-24)
