"""Aggregation maths on int32 fixed-point weight lists, exact to the bit (docs/verifiable.md).

Every rule works coordinate by coordinate in integers: products and sums in int64, division
rounded towards minus infinity. No float is involved, so any machine, process or numpy build
computes the same bits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from training.errors import WeightsMismatchError

Weights = list[np.ndarray]

# Elements per chunk: a 256 KiB int64 slice of the accumulator plus its scratch stay in a
# 1 MiB L2, so each update streams from memory once and no update-sized temporary is made.
CHUNK = 1 << 15
# The contract's cap on trainers and on a recorded sample count: with them a weighted sum of
# int32 values stays within int64 (sum of weights <= 2^31, |sum of w*u| <= 2^62).
MAX_UPDATES = 128
MAX_SAMPLES = 1 << 24


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
    """Raise WeightsMismatchError unless every entry matches the first and holds int32; raise
    ValueError for none or more than MAX_UPDATES."""
    if not weights_list:
        raise ValueError("nothing to aggregate")
    if len(weights_list) > MAX_UPDATES:
        raise ValueError(f"{len(weights_list)} updates; at most {MAX_UPDATES} are aggregated")
    reference = weights_list[0]
    for index, layer in enumerate(reference):
        if layer.dtype != np.int32:
            raise WeightsMismatchError(
                f"aggregation needs int32 fixed-point weights; layer {index} is {layer.dtype}"
            )
    for position, weights in enumerate(weights_list[1:], start=1):
        reason = weight_mismatch(weights, reference=reference)
        if reason is not None:
            raise WeightsMismatchError(
                f"update {position} {reason} (as in update 0)", position=position, reason=reason
            )


def _flat(layer: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(layer).reshape(-1)


def _check_counts(counts: Sequence[object]) -> None:
    for count in counts:
        if isinstance(count, bool) or not isinstance(count, int | np.integer):
            raise ValueError(f"sample counts must be integers, got {counts}")
        if not 1 <= count <= MAX_SAMPLES:
            raise ValueError(f"sample counts must be in 1..{MAX_SAMPLES}, got {counts}")


def weighted_mean(results: Sequence[tuple[Sequence[np.ndarray], int]]) -> Weights:
    """``floor(sum(w_k * u_k) / sum(w_k))`` per coordinate, each ``w_k`` an integer in
    1..MAX_SAMPLES. Accumulates in int64, chunk by chunk, in place."""
    weights_list = [weights for weights, _ in results]
    check_compatible(weights_list)
    counts = [count for _, count in results]
    _check_counts(counts)
    factors = [np.int64(count) for count in counts]
    total = np.int64(sum(int(count) for count in counts))
    out: Weights = []
    for index, first in enumerate(weights_list[0]):
        result = np.empty(first.size, dtype=np.int32)
        acc = np.empty(min(CHUNK, first.size), dtype=np.int64)
        scratch = np.empty_like(acc)
        flats = [_flat(weights[index]) for weights in weights_list]
        for start in range(0, first.size, CHUNK):
            stop = min(start + CHUNK, first.size)
            dst, tmp = acc[: stop - start], scratch[: stop - start]
            np.multiply(flats[0][start:stop], factors[0], out=dst)
            for flat, factor in zip(flats[1:], factors[1:], strict=True):
                np.multiply(flat[start:stop], factor, out=tmp)
                np.add(dst, tmp, out=dst)
            # numpy's integer floor_divide rounds towards minus infinity, as the spec says.
            np.floor_divide(dst, total, out=dst)
            result[start:stop] = dst
        out.append(result.reshape(first.shape))
    return out


@dataclass(frozen=True)
class Sums:
    """A selection of updates as weighted_mean sums them: ``sum(w_k * u_k)`` per coordinate
    (int64, per layer) and ``sum(w_k)``."""

    layers: tuple[np.ndarray, ...]
    total: int


class WeightedTally:
    """weighted_mean of selections of the same updates that grow one update at a time (as
    Shapley scoring's sampled orders do): a selection's sums are the smaller one's plus one
    update's, one pass over the values instead of one per update selected. The sums are
    exact integers, so ``mean`` is weighted_mean of the selection, bit for bit."""

    def __init__(self, weights_list: Sequence[Sequence[np.ndarray]], counts: Sequence[int]):
        check_compatible(weights_list)
        _check_counts(counts)
        if len(counts) != len(weights_list):
            raise ValueError(f"{len(counts)} sample counts for {len(weights_list)} updates")
        self._weights = weights_list
        self._counts = [int(count) for count in counts]

    def grow(self, sums: Sums | None, index: int) -> Sums:
        """The sums of ``sums``' selection (None: of none) with update ``index`` added."""
        factor = self._counts[index]
        layers = tuple(np.multiply(layer, factor, dtype=np.int64) for layer in self._weights[index])
        if sums is not None:
            for layer, earlier in zip(layers, sums.layers, strict=True):
                np.add(layer, earlier, out=layer)
        return Sums(layers=layers, total=factor + (sums.total if sums else 0))

    @staticmethod
    def mean(sums: Sums) -> Weights:
        # numpy's integer floor_divide rounds towards minus infinity, as the spec says.
        return [(layer // sums.total).astype(np.int32) for layer in sums.layers]


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
    """Sort a (k, n) stack along axis 0 in place: each column ascending."""
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
    """Coordinate-wise median (unweighted): the middle value, or for an even count
    ``floor((a + b) / 2)`` of the two middle ones."""

    def reduce(stack: np.ndarray, out: np.ndarray) -> None:
        count = stack.shape[0]
        if count % 2:
            out[...] = stack[count // 2]
        else:
            pair = np.add(stack[count // 2 - 1], stack[count // 2], dtype=np.int64)
            out[...] = np.right_shift(pair, 1, out=pair)  # an arithmetic shift is floor(x / 2)

    return _sorted_reduce(weights_list, reduce)


def trimmed_mean(weights_list: Sequence[Sequence[np.ndarray]], *, trim_per_mille: int) -> Weights:
    """Coordinate-wise mean after dropping ``t = floor(trim_per_mille * k / 1000)`` of the
    largest and of the smallest values of each coordinate: ``floor(sum(kept) / (k - 2t))``
    (unweighted); 0 <= trim_per_mille <= 499 so at least one value remains."""
    check_trim(trim_per_mille)
    cut = trim_per_mille * len(weights_list) // 1000

    def reduce(stack: np.ndarray, out: np.ndarray) -> None:
        kept = stack[cut : stack.shape[0] - cut]
        total = np.sum(kept, axis=0, dtype=np.int64)
        out[...] = np.floor_divide(total, kept.shape[0], out=total)

    return _sorted_reduce(weights_list, reduce)


def check_trim(trim_per_mille: int) -> None:
    """Raise ValueError unless ``trim_per_mille`` is an integer in 0..499."""
    if (
        isinstance(trim_per_mille, bool)
        or not isinstance(trim_per_mille, int)
        or not 0 <= trim_per_mille <= 499
    ):
        raise ValueError(f"trim_per_mille must be an integer in 0..499, got {trim_per_mille!r}")
