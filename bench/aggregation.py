"""Aggregation benchmark: the integer strategies' throughput beside plain memory-copy bandwidth,
the cost of a model's Merkle tree, and a local round.

Run ``python -m bench.aggregation``; prints a table and writes var/bench/aggregation.json.
Throughput counts each update's bytes once (10 updates of 10 M int32 values = 400 MB); memory
copy counts the bytes of the array copied; the Merkle figure is the time to hash a blob's
chunks and build its tree (what writing or checking a blob costs beyond copying), per MB of
values. All run in the same process, one after the other, so their ratios mean something on a
shared, noisy machine; the absolute figures are indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training import merkle
from training.aggregation import STRATEGIES, Strategy, Update
from training.fixedpoint import quantize
from training.serialize import CHUNK_VALUES, VALUE, leaves_of

MB = 1_000_000
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "var" / "bench" / "aggregation.json"
SIZES = {"1M": 1_000_000, "10M": 10_000_000}


def best_seconds(action: Callable[[], Any], *, repeats: int) -> tuple[float, float]:
    """(first, best) wall time of ``repeats`` runs of ``action``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return times[0], min(times)


def memcpy_mbps(*, nbytes: int, repeats: int) -> float:
    """MB/s of numpy.copyto over an int32 array of ``nbytes`` (best run, pages pre-touched)."""
    src = np.ones(nbytes // 4, dtype=np.int32)
    dst = np.zeros_like(src)
    _, best = best_seconds(lambda: np.copyto(dst, src), repeats=repeats)
    return nbytes / best / MB


def make_updates(*, params: int, count: int, seed: int = 0) -> list[Update]:
    """``count`` updates of one int32 fixed-point layer of ``params`` values (weights drawn
    from N(0, 0.1), as trained layers hold), with different sample counts."""
    rng = np.random.default_rng(seed)
    return [
        Update(
            weights=quantize([rng.normal(0.0, 0.1, params).astype(np.float32)]),
            num_examples=100 + i,
            update_id=f"device-{i}",
        )
        for i in range(count)
    ]


def strategy_mbps(
    *, strategy: Strategy, updates: Sequence[Update], repeats: int
) -> tuple[float, float]:
    """(first call, best call) MB/s of ``strategy.aggregate`` over ``updates``."""
    nbytes = sum(layer.nbytes for update in updates for layer in update.weights)
    first, best = best_seconds(lambda: strategy.aggregate(updates), repeats=repeats)
    return nbytes / first / MB, nbytes / best / MB


def merkle_ms_per_mb(*, params: int, repeats: int) -> float:
    """Milliseconds per MB of values to hash a blob's chunks into leaves and build the tree."""
    data = np.arange(params, dtype=np.int32).astype(VALUE).tobytes()
    _, best = best_seconds(
        lambda: merkle.root(leaves_of(data, chunk_values=CHUNK_VALUES)), repeats=repeats
    )
    return best * 1000 / (len(data) / MB)


def train_round_seconds(*, repeats: int) -> tuple[float, float]:
    """(first, best) seconds of one local round: MLP, one digits partition, one epoch.

    The first includes importing TF and tracing the model, which a device pays once."""
    from training.catalogue import initial_weights
    from training.datasets import load_partition
    from training.local import train_round
    from training.spec import TaskSpec

    spec = TaskSpec(model="digits-mlp", dataset="digits-8x8", rounds=1, local_epochs=1)
    weights = initial_weights(spec=spec)
    data = load_partition(schema=spec.schema, index=0, count=5, alpha=0.5, seed=0)
    return best_seconds(lambda: train_round(spec=spec, weights=weights, data=data), repeats=repeats)


def run(
    *,
    memcpy_bytes: int = 400 * MB,
    sizes: dict[str, int] = SIZES,
    updates: int = 10,
    repeats: int = 3,
    train: bool = True,
) -> dict[str, Any]:
    """Measure everything and return the JSON-ready results."""
    results: dict[str, Any] = {"memcpy_MBps": memcpy_mbps(nbytes=memcpy_bytes, repeats=repeats)}
    by_strategy: dict[str, dict[str, float]] = {key: {} for key in STRATEGIES}
    first_fedavg: dict[str, float] = {}
    for label, params in sizes.items():
        batch = make_updates(params=params, count=updates)
        for key, cls in STRATEGIES.items():
            first, best = strategy_mbps(strategy=cls(), updates=batch, repeats=repeats)
            by_strategy[key][label] = best
            if key == "fedavg":
                first_fedavg[label] = first
        del batch
    results["fedavg_MBps"] = by_strategy["fedavg"]
    results["fedavg_first_call_MBps"] = first_fedavg
    results["fedmedian_MBps"] = by_strategy["fedmedian"]
    results["fedtrimmedavg_MBps"] = by_strategy["fedtrimmedavg"]
    largest = max(sizes, key=sizes.__getitem__)
    results["fedavg_to_memcpy_ratio"] = by_strategy["fedavg"][largest] / results["memcpy_MBps"]
    results["merkle_ms_per_MB"] = merkle_ms_per_mb(params=sizes[largest], repeats=repeats)
    if train:
        first, best = train_round_seconds(repeats=repeats)
        results["train_round_s"] = best
        results["train_round_first_s"] = first
    results["setup"] = {
        "updates": updates,
        "params": sizes,
        "memcpy_bytes": memcpy_bytes,
        "repeats": repeats,
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    return results


def table(results: dict[str, Any]) -> str:
    """The results as a plain-text table."""
    rows = [("memory copy (numpy.copyto)", f"{results['memcpy_MBps']:,.0f} MB/s")]
    for key in ("fedavg", "fedmedian", "fedtrimmedavg"):
        for label, value in results[f"{key}_MBps"].items():
            rows.append(
                (f"{key}, {results['setup']['updates']} updates x {label}", f"{value:,.0f} MB/s")
            )
    for label, value in results["fedavg_first_call_MBps"].items():
        rows.append((f"fedavg first call (fresh output), {label}", f"{value:,.0f} MB/s"))
    rows.append(("fedavg / memory copy", f"{results['fedavg_to_memcpy_ratio']:.2f}"))
    rows.append(("Merkle tree (leaves + nodes) per MB", f"{results['merkle_ms_per_MB']:.1f} ms"))
    if "train_round_s" in results:
        rows.append(("local round, MLP, 1 epoch", f"{results['train_round_s'] * 1000:,.0f} ms"))
        rows.append(
            ("  first round (TF import + trace)", f"{results['train_round_first_s']:.2f} s")
        )
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:>14}" for name, value in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aggregation", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    results = run(repeats=args.repeats)
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
