"""32-bit fixed point: float32 weights to the integers a model blob holds, and back.

docs/verifiable.md fixes the rule: ``q = clamp(round_half_even(x * 2^F), -2^31, 2^31 - 1)``
and ``x = q / 2^F`` in float32. Every step is an exact IEEE operation or a single correctly
rounded one, so every machine gets the same integers from the same floats.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from training.errors import NonFiniteWeightsError

SCALE_BITS = 16
INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1


def quantize(weights: Sequence[np.ndarray], *, scale_bits: int = SCALE_BITS) -> list[np.ndarray]:
    """Each layer as int32 fixed point with ``scale_bits`` fractional bits.

    Raises NonFiniteWeightsError naming the first layer that holds NaN or infinity."""
    out = []
    for index, layer in enumerate(weights):
        # float64 holds every float32 times 2^F exactly; rint rounds half to even.
        scaled = np.asarray(layer, dtype=np.float64) * float(1 << scale_bits)
        if not np.isfinite(scaled).all():
            raise NonFiniteWeightsError(layer=index)
        np.rint(scaled, out=scaled)
        np.clip(scaled, INT32_MIN, INT32_MAX, out=scaled)
        out.append(scaled.astype(np.int32))
    return out


def dequantize(values: Sequence[np.ndarray], *, scale_bits: int = SCALE_BITS) -> list[np.ndarray]:
    """Each layer of int32 fixed point as float32 (``q / 2^F``, rounded once to float32)."""
    # int32 -> float64 and the division by a power of two are exact; astype rounds once.
    scale = float(1 << scale_bits)
    return [(np.asarray(q, dtype=np.float64) / scale).astype(np.float32) for q in values]
