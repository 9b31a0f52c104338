"""Aggregation maths on numpy weight lists: weighted mean, coordinate-wise median, trimmed mean."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np

from training.errors import WeightsMismatchError

Weights = list[np.ndarray]

# Elements per chunk: a 512 KiB float32 slice of the accumulator plus its scratch stay in a
# 1-2 MiB L2, so each update streams from memory once and no update-sized temporary is made.
CHUNK = 1 << 17


def weight_mismatch(
    weights: Sequence[np.ndarray], *, reference: Sequence[np.ndarray]
) -> str | None:
    """Why ``weights`` cannot join ``reference`` (layer count, shape, dtype), or None."""
    if len(weights) != len(reference):
        return f"has {len(weights)} weight arrays, {len(reference)} expected"
    for index, (layer, expected) in enumerate(zip(weights, reference, strict=True)):
        if layer.shape != expected.shape:
            return f"layer {index} has shape {layer.shape}, {expected.shape} expected"
        if layer.dtype != expected.dtype:
            return f"layer {index} has dtype {layer.dtype}, {expected.dtype} expected"
    return None


def check_compatible(weights_list: Sequence[Sequence[np.ndarray]]) -> None:
    """Raise WeightsMismatchError unless every entry matches the first and holds floats."""
    if not weights_list:
        raise ValueError("nothing to aggregate")
    reference = weights_list[0]
    for index, layer in enumerate(reference):
        if not np.issubdtype(layer.dtype, np.floating):
            raise WeightsMismatchError(
                f"aggregation needs floating-point weights; layer {index} is {layer.dtype}"
            )
    for position, weights in enumerate(weights_list[1:], start=1):
        reason = weight_mismatch(weights, reference=reference)
        if reason is not None:
            raise WeightsMismatchError(
                f"update {position} {reason} (as in update 0)", position=position, reason=reason
            )


def _flat(layer: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(layer).reshape(-1)


def weighted_mean(results: Sequence[tuple[Sequence[np.ndarray], float]]) -> Weights:
    """Mean of the weight lists, each weighted by its (non-negative) count; counts must not sum
    to zero. Accumulates in place, chunk by chunk, in the layer's dtype (float16 in float32)."""
    weights_list = [weights for weights, _ in results]
    check_compatible(weights_list)
    counts = [float(count) for _, count in results]
    if any(count < 0 for count in counts) or not sum(counts) > 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {counts}")
    total = sum(counts)
    factors = [count / total for count in counts]
    out: Weights = []
    for index, first in enumerate(weights_list[0]):
        acc_dtype = np.result_type(first.dtype, np.float32)
        acc = np.empty(first.size, dtype=acc_dtype)
        scratch = np.empty(min(CHUNK, first.size), dtype=acc_dtype)
        flats = [_flat(weights[index]) for weights in weights_list]
        for start in range(0, first.size, CHUNK):
            stop = min(start + CHUNK, first.size)
            dst, tmp = acc[start:stop], scratch[: stop - start]
            np.multiply(flats[0][start:stop], factors[0], out=dst)
            for flat, factor in zip(flats[1:], factors[1:], strict=True):
                np.multiply(flat[start:stop], factor, out=tmp)
                np.add(dst, tmp, out=dst)
        out.append(acc.astype(first.dtype, copy=False).reshape(first.shape))
    return out


# Updates sorted per coordinate at once: k rows of this many elements stay in L2.
STACK_CHUNK = 1 << 14
# Up to this many updates a sorting network (elementwise min/max over whole rows) beats
# numpy's per-coordinate sort along axis 0 by several times; beyond, its O(k log^2 k) loses.
NETWORK_MAX = 32


@functools.cache
def sorting_network(count: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchange pairs of Batcher's odd-even merge sort for ``count`` inputs."""
    pairs: list[tuple[int, int]] = []
    span = 1
    while span < count:
        step = span
        while step >= 1:
            for base in range(step % span, count - step, 2 * step):
                for i in range(min(step, count - base - step)):
                    if (i + base) // (span * 2) == (i + base + step) // (span * 2):
                        pairs.append((i + base, i + base + step))
            step //= 2
        span *= 2
    return tuple(pairs)


def sort_rows(stack: np.ndarray) -> None:
    """Sort a (k, n) stack along axis 0 in place: each column ascending. Expects no NaN."""
    count = stack.shape[0]
    if count > NETWORK_MAX:
        stack.sort(axis=0)
        return
    low = np.empty(stack.shape[1], dtype=stack.dtype)
    for i, j in sorting_network(count):
        np.minimum(stack[i], stack[j], out=low)
        np.maximum(stack[i], stack[j], out=stack[j])
        stack[i] = low


def _sorted_reduce(
    weights_list: Sequence[Sequence[np.ndarray]], reduce: Callable[[np.ndarray, np.ndarray], None]
) -> Weights:
    """Apply ``reduce(sorted_stack, out)`` to each layer, STACK_CHUNK coordinates at a time;
    ``sorted_stack`` is (k, n), every column sorted ascending."""
    check_compatible(weights_list)
    count = len(weights_list)
    out: Weights = []
    for index, first in enumerate(weights_list[0]):
        result = np.empty(first.size, dtype=first.dtype)
        flats = [_flat(weights[index]) for weights in weights_list]
        for start in range(0, first.size, STACK_CHUNK):
            stop = min(start + STACK_CHUNK, first.size)
            stack = np.empty((count, stop - start), dtype=first.dtype)
            for row, flat in enumerate(flats):
                stack[row] = flat[start:stop]
            sort_rows(stack)
            reduce(stack, result[start:stop])
        out.append(result.reshape(first.shape))
    return out


def coordinate_median(weights_list: Sequence[Sequence[np.ndarray]]) -> Weights:
    """Coordinate-wise median of the weight lists (unweighted; expects finite values)."""

    def reduce(stack: np.ndarray, out: np.ndarray) -> None:
        count = stack.shape[0]
        if count % 2:
            out[...] = stack[count // 2]
        else:
            # Halve before adding: the mean of two huge (poisoned) values must not overflow.
            np.multiply(stack[count // 2 - 1], 0.5, out=out)
            out += stack[count // 2] * 0.5

    return _sorted_reduce(weights_list, reduce)


def trimmed_mean(weights_list: Sequence[Sequence[np.ndarray]], *, trim_ratio: float) -> Weights:
    """Coordinate-wise mean after dropping the floor(trim_ratio * k) largest and smallest values
    of each coordinate (unweighted; expects finite values); 0 <= trim_ratio < 0.5 so at least
    one value remains."""
    if not 0.0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    cut = int(trim_ratio * len(weights_list))

    def reduce(stack: np.ndarray, out: np.ndarray) -> None:
        kept = stack[cut : stack.shape[0] - cut]
        np.sum(kept, axis=0, out=out)
        out /= kept.shape[0]

    return _sorted_reduce(weights_list, reduce)
