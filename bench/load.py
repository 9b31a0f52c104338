"""The `make demo` workload on a busy machine and on a quiet one, in one run: the loaded run
has two CPU-bound processes and one that keeps the disk busy (as a large install beside it
does) for its whole length, and starts from a cold page cache (dropped when running as root).
Each run is a stack of its own, in a process of its own. Writes var/bench/load.json: each
run's round times and bid latencies (the bidding notice to the bid on chain), final accuracy
and outcome.

Targets: both runs finalize, the loaded run's accuracy is within 0.01 of the quiet one's, and
the loaded run's bid latency p99 is under 2 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench import verdict

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "var" / "bench"
ROUNDS = 10
BID_P99_TARGET_S = 2.0
ACCURACY_GAP = 0.01
# What the disk-bound process writes, syncs and reads back, over and over.
DISK_FILE_BYTES = 256 * 2**20


def _spin() -> None:
    while True:
        pass


def _churn_disk(directory: str) -> None:
    """Write a large file, sync it, read it back, delete it: a package install's disk use."""
    block = os.urandom(2**20)
    path = Path(directory) / "churn.bin"
    while True:
        with open(path, "wb") as out:
            for _ in range(DISK_FILE_BYTES // len(block)):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        with open(path, "rb") as back:
            while back.read(2**20):
                pass
        path.unlink()


def cache_drop() -> bool:
    """Empty the kernel's page cache (root only): the loaded run starts cold."""
    if os.geteuid() != 0:
        return False
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def machine_busy(directory: Path) -> Iterator[None]:
    """Two CPU-bound processes and one disk-bound process, for as long as the block runs."""
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_spin, daemon=True) for _ in range(2)]
    procs.append(context.Process(target=_churn_disk, args=(str(directory),), daemon=True))
    for proc in procs:
        proc.start()
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(10)


class BidWatch(threading.Thread):
    """When each bid first shows on chain, as seen by polling the contract every 50 ms."""

    def __init__(self, market) -> None:
        super().__init__(daemon=True)
        self.market = market
        self.seen: dict[tuple[int, str], float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            with contextlib.suppress(Exception):  # a slow answer: look again
                for task_id in range(1, self.market.task_count() + 1):
                    for bid in self.market.bids(task_id=task_id):
                        self.seen.setdefault((task_id, bid.device.lower()), time.time())


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_once(label: str) -> dict:
    """One stack, one task of the demo workload; the figures of this run."""
    from chain.launcher import free_port
    from stack.demo import DEMO_SPEC, budget_for, follow_task
    from stack.devstack import TRAINERS, stack

    with tempfile.TemporaryDirectory(prefix=f"flex-load-{label}-") as tmp:
        var = Path(tmp)
        os.environ["DATABASE_URL"] = f"sqlite:///{var / 'db.sqlite3'}"
        os.environ["FLEX_WEB_PORT"] = str(free_port())
        os.environ["FLEX_CHAIN_PORT"] = str(free_port())
        started = time.monotonic()
        with stack(var=var, quiet_web=True, ephemeral=True) as up:
            ready_s = time.monotonic() - started
            from chain.client import FlexMarket
            from chain.node import connect

            deployment = json.loads((var / "chain" / "deployment.json").read_text())
            watch = BidWatch(
                FlexMarket(w3=connect(up["env"]["ETH_RPC_URL"]), address=deployment["address"])
            )
            watch.start()
            summary = follow_task(
                up,
                out=var / "load",
                spec_fields={**DEMO_SPEC, "rounds": ROUNDS},
                trainers=TRAINERS,
                budget_wei=budget_for(rounds=ROUNDS, trainers=TRAINERS),
                round_timeout_s=120,
            )
            watch.stop.set()
            from marketplace.models import LifecycleAction

            notice = LifecycleAction.objects.get(
                task__chain_task_id=summary["task_id"], action=LifecycleAction.Action.NOTIFY_BIDS
            ).fired_at.timestamp()
    latencies = [
        round(at - notice, 3) for (task_id, _), at in watch.seen.items()
        if task_id == summary["task_id"]
    ]  # fmt: skip
    return {
        "state": summary["state"],
        "final_accuracy": summary["final_accuracy"],
        "round_s": [r["wall_s"] for r in summary["rounds"]],
        "updates": [r["updates"] for r in summary["rounds"]],
        "bid_latency_s": sorted(latencies),
        "bid_latency_p50_s": percentile(latencies, 0.5),
        "bid_latency_p99_s": percentile(latencies, 0.99),
        "bids": len(latencies),
        "stack_ready_s": round(ready_s, 1),
        "conserved": summary["conserved"],
    }


def child(label: str, out: Path) -> dict:
    """``run_once`` in a process of its own (Django is set up once per process)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.load", "--run", label, "--out", str(out)], cwd=ROOT
    )
    if done.returncode != 0 or not out.exists():
        return {"state": "error", "exit": done.returncode}
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        args.out.write_text(json.dumps(run_once(args.run), indent=2) + "\n")
        return 0

    with tempfile.TemporaryDirectory(prefix="flex-load-") as tmp:
        tmp = Path(tmp)
        print("quiet run: the demo workload on the machine as it is", flush=True)
        quiet = child("quiet", tmp / "quiet.json")
        cold = cache_drop()
        print(
            "loaded run: 2 CPU-bound processes and 1 disk-bound process beside it, "
            + ("from a cold page cache" if cold else "page cache kept (dropping it needs root)"),
            flush=True,
        )
        with machine_busy(tmp):
            loaded = child("loaded", tmp / "loaded.json")
    loaded["cold_start"] = cold
    result = {
        "quiet": quiet,
        "loaded": loaded,
        "rounds": ROUNDS,
        "targets": {"bid_latency_p99_s": BID_P99_TARGET_S, "accuracy_gap": ACCURACY_GAP},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "load.json").write_text(json.dumps(result, indent=2) + "\n")

    def fmt(value, spec=".3f") -> str:
        return "-" if value is None else format(value, spec)

    print(f"{'':<28} {'quiet':>10} {'loaded':>10}")
    for name, key, spec in (
        ("outcome", "state", ""),
        ("final accuracy", "final_accuracy", ".4f"),
        ("bids", "bids", ""),
        ("bid latency p50 (s)", "bid_latency_p50_s", ".3f"),
        ("bid latency p99 (s)", "bid_latency_p99_s", ".3f"),
    ):
        print(f"{name:<28} {fmt(quiet.get(key), spec):>10} {fmt(loaded.get(key), spec):>10}")
    for run, figures in (("quiet", quiet), ("loaded", loaded)):
        rounds = figures.get("round_s") or []
        if rounds:
            print(f"{run} round times (s): {', '.join(f'{s:.1f}' for s in rounds)}")
    ok = (
        quiet.get("state") == loaded.get("state") == "finalized"
        and abs(quiet["final_accuracy"] - loaded["final_accuracy"]) <= ACCURACY_GAP
        and loaded["bid_latency_p99_s"] is not None
        and loaded["bid_latency_p99_s"] < BID_P99_TARGET_S
    )
    print("targets met" if ok else "TARGET MISSED")
    return verdict(ok)


if __name__ == "__main__":
    sys.exit(main())
