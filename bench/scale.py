"""Scale: 100 registered devices served by a few worker processes bid on one task; 50 are
selected as trainers for 3 rounds. Time and gas per round, and peak memory, to
var/bench/scale.json."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from chain.launcher import free_port
from stack.demo import DEMO_SPEC, follow_task
from stack.devstack import LocalDevice, stack

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "var" / "bench"
DEVICES, TRAINERS, ROUNDS, HOMES_PER_WORKER = 100, 50, 3, 25


def fleet() -> tuple[LocalDevice, ...]:
    """One aggregator and DEVICES trainers with spread prices and non-IID digits slices."""
    trainers = tuple(
        LocalDevice(
            f"sim-{i:03d}",
            ("cpu", "gpu", "jetson")[i % 3],
            10**14 + (i % 10) * 10**13,
            partition=i,
            partitions=DEVICES,
        )
        for i in range(DEVICES)
    )
    return (LocalDevice("aggregator", "gpu", 10**14, aggregator_price_wei=2 * 10**14), *trainers)


def peak_rss_mb(pids: list[int]) -> tuple[float, float]:
    """(largest, total) peak resident memory of the given processes and their children."""
    peaks = []
    for pid in _with_children(pids):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return (max(peaks, default=0.0), sum(peaks))


def _with_children(pids: list[int]) -> list[int]:
    found = list(pids)
    for pid in pids:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        found += _with_children([int(c) for c in children])
    return found


def main() -> int:
    devices = fleet()
    with tempfile.TemporaryDirectory(prefix="flex-scale-") as tmp:
        var = Path(tmp)
        # A throwaway database: a benchmark never touches the data of a configured one.
        os.environ["DATABASE_URL"] = f"sqlite:///{var / 'db.sqlite3'}"
        os.environ["FLEX_WEB_PORT"] = str(free_port())
        os.environ["FLEX_CHAIN_PORT"] = str(free_port())
        with stack(
            var=var,
            quiet_web=True,
            devices=devices,
            homes_per_worker=HOMES_PER_WORKER,
            ephemeral=True,
        ) as up:
            summary = follow_task(
                up,
                out=var / "scale",
                spec_fields={**DEMO_SPEC, "rounds": ROUNDS, "local_epochs": 1},
                trainers=TRAINERS,
                budget_wei=10**18,
                round_timeout_s=120,
                timeout_s=900,
            )
            pids = [p.pid for p in up["supervisor"].procs.values()]
            largest, total = peak_rss_mb(pids)
    rounds = summary["rounds"]
    if summary["state"] != "finalized" or len(rounds) != ROUNDS:
        print(
            f"scale run did not finish: {summary['state']}, {len(rounds)} rounds", file=sys.stderr
        )
        return 1
    steady = rounds[1:] or rounds
    result = {
        "devices": DEVICES,
        "trainers": TRAINERS,
        "rounds": ROUNDS,
        "worker_processes": -(-DEVICES // HOMES_PER_WORKER) + 1,
        "round_s": round(sum(r["wall_s"] for r in steady) / len(steady), 3),
        "first_round_s": rounds[0]["wall_s"],
        "gas_per_round": sum(r["gas"] for r in rounds) // len(rounds),
        "peak_rss_mb": round(total, 1),
        "peak_rss_largest_process_mb": round(largest, 1),
        "updates_per_round": [r["updates"] for r in rounds],
        "final_accuracy": summary["final_accuracy"],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key:<30} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
