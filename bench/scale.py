"""Scale: up to 1,000 registered devices, served by a few worker processes, bid on tasks of
128, 32 and 8 trainers (the contract's limits: 1,000 bids, 128 trainers), 5 rounds each.

Writes var/bench/scale.json (enrolment time per device at 10 and 100 devices, and per task
size the time and gas per round, the gas of selection over every bid) and beside it
scale.png (round time and gas against trainers), with the peak memory of every process.

    python -m bench scale              # 1,000 devices; 128, 32, 8 trainers x 5 rounds
    python -m bench scale --quick      # 120 devices; 16, 4 trainers x 2 rounds: minutes
    python -m bench scale --devices 500 --trainers 8,64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from bench import MAX_BIDS, MAX_ROUNDS, MAX_TRAINERS
from bench.procs import peak_rss_mb
from bench.scale_plot import scale_plot, task_figures
from bench.web import throwaway_database
from chain.launcher import free_port
from stack.demo import DEMO_SPEC, follow_task
from stack.devstack import LocalDevice, stack

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "var" / "bench"
# Each SLICES trainers in a row split the digits set this many ways (non-IID, about 14 samples
# a slice), every run of them by a seed of its own: no two trainers hold the same data. Two
# that did would hand in the same update, and the aggregator would leave the copy out
# (scale.json's updates_per_round), so a task would aggregate and score fewer trainers than
# it selected and pays.
SLICES = MAX_TRAINERS
ENROL_WAVES = (10, 100)
TRAINER_PRICES = tuple(10**14 + step * 10**13 for step in range(10))
AGGREGATOR_PRICE = 2 * 10**14


def fleet(devices: int) -> tuple[LocalDevice, ...]:
    """One aggregator and ``devices`` - 1 trainers, spread over prices, classes and slices:
    each SLICES trainers in a row ask one price and hold the slices of one split of the set.
    (Selection goes by price per sample, so a dearer trainer with a larger slice may still be
    taken: every trainer's data differs from every other's, not only within a price.)"""
    trainers = tuple(
        LocalDevice(
            f"sim-{i:04d}",
            ("cpu", "gpu", "jetson")[i % 3],
            TRAINER_PRICES[i // SLICES % len(TRAINER_PRICES)],
            partition=i % SLICES,
            partitions=SLICES,
            partition_seed=i // SLICES,
        )
        for i in range(devices - 1)
    )
    aggregator = LocalDevice("aggregator", "gpu", 10**14, aggregator_price_wei=AGGREGATOR_PRICE)
    return (aggregator, *trainers)


def budget_wei(*, trainers: int, rounds: int) -> int:
    """Enough for ``trainers`` at the dearest price, half again: selection takes the cheapest
    and stops at the budget, so every task gets the trainers it asks for."""
    return rounds * (AGGREGATOR_PRICE + trainers * max(TRAINER_PRICES)) * 3 // 2


def _selection_gas(task_id: int) -> int | None:
    from marketplace.models_platform import LifecycleAction

    action = LifecycleAction.objects.filter(
        task__chain_task_id=task_id, action=LifecycleAction.Action.SELECT_NODES
    ).first()
    return action.detail.get("gas_used") if action else None


def enrol_run(*, devices: int) -> dict:
    """Enrolment alone: a stack brought up to its enrolled fleet, no tasks."""
    with (
        tempfile.TemporaryDirectory(prefix="flex-enrol-") as tmp,
        throwaway_database() as database_url,
    ):
        os.environ["DATABASE_URL"] = database_url
        os.environ["FLEX_WEB_PORT"] = str(free_port())
        os.environ["FLEX_CHAIN_PORT"] = str(free_port())
        os.environ["FLEX_DEBUG"] = "0"  # production settings: no per-query debug bookkeeping
        waves = tuple(w for w in ENROL_WAVES if w < devices)
        with stack(
            var=Path(tmp),
            quiet_web=True,
            devices=fleet(devices),
            ephemeral=True,
            enrol_waves=waves,
            enrol_only=True,
        ) as up:
            issued, enrolments = up["join_tokens"], up["enrolments"]
    return {
        "devices": devices,
        "database": urlsplit(database_url).scheme,
        "join_tokens": {"devices": issued.devices, "seconds": round(issued.seconds, 2)},
        "enrolment": [_enrolment_figures(e) for e in enrolments],
    }


def _enrolment_figures(e) -> dict:
    return {
        "devices": e.devices,
        "seconds": round(e.seconds, 2),
        "per_device_s": round(e.per_device_s, 3),
    }


def run(*, devices: int, trainer_counts: list[int], rounds: int, homes_per_worker: int) -> dict:
    fleet_ = fleet(devices)
    # Every device bids on every task: the window grows with the fleet, a slow machine
    # delays the run and never loses bids.
    window = 30 + devices * 3 // 10
    tasks, enrolments, memory = [], [], {}
    with (
        tempfile.TemporaryDirectory(prefix="flex-scale-") as tmp,
        throwaway_database() as database_url,
    ):
        var = Path(tmp)
        # A database of the run's own: PostgreSQL beside DATABASE_URL when it names one (many
        # processes write at once, which SQLite takes in turn), else SQLite.
        os.environ["DATABASE_URL"] = database_url
        os.environ["FLEX_WEB_PORT"] = str(free_port())
        os.environ["FLEX_CHAIN_PORT"] = str(free_port())
        os.environ["FLEX_DEBUG"] = "0"  # production settings: no per-query debug bookkeeping
        waves = tuple(w for w in ENROL_WAVES if w < devices)
        with stack(
            var=var,
            quiet_web=True,
            devices=fleet_,
            homes_per_worker=homes_per_worker,
            ephemeral=True,
            enrol_waves=waves,
        ) as up:
            issued = up["join_tokens"]
            tokens = {"devices": issued.devices, "seconds": round(issued.seconds, 2)}
            enrolments = [_enrolment_figures(e) for e in up["enrolments"]]
            for trainers in trainer_counts:
                summary = follow_task(
                    up,
                    out=var / f"scale-{trainers}",
                    spec_fields={**DEMO_SPEC, "rounds": rounds, "local_epochs": 1},
                    trainers=trainers,
                    budget_wei=budget_wei(trainers=trainers, rounds=rounds),
                    round_timeout_s=600,
                    timeout_s=window + rounds * 900 + 600,
                    bidding_window_s=window,
                )
                from marketplace import contract

                info = contract.market().task(task_id=summary["task_id"])
                tasks.append(
                    task_figures(
                        summary,
                        trainers=trainers,
                        bids=info.bid_count,
                        selection_gas=_selection_gas(summary["task_id"]),
                    )
                )
                print(f"[scale] {trainers} trainers: {json.dumps(tasks[-1])}", flush=True)
                # What is done so far, in case a later, larger task does not finish.
                write(
                    {"devices": devices, "rounds": rounds, "enrolment": enrolments, "tasks": tasks},
                    complete=False,
                )
            memory = {n: peak_rss_mb(p.pid) for n, p in up["supervisor"].procs.items()}
    # This process enrolled the devices (keys, certificates, HTTP) and followed the tasks.
    memory["bench (enrolment)"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    return {
        "devices": devices,
        "worker_processes": len([n for n in memory if n.startswith("devices-")]) + 1,
        "homes_per_worker": homes_per_worker,
        "rounds": rounds,
        "database": urlsplit(os.environ["DATABASE_URL"]).scheme,
        "join_tokens": tokens,
        "enrolment": enrolments,
        "tasks": tasks,
        "peak_rss_mb": memory,
        "peak_rss_largest_process_mb": max(memory.values()),
    }


def _sizes(text: str) -> list[int]:
    try:
        # In the order given: the largest first keeps its figures if a later task overruns.
        sizes = list(dict.fromkeys(int(part) for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers such as 8,32,128, not {text!r}"
        ) from None
    if not sizes or min(sizes) < 1 or max(sizes) > MAX_TRAINERS:
        raise argparse.ArgumentTypeError(
            f"trainers per task must be between 1 and the contract's {MAX_TRAINERS}: {text!r}"
        )
    return sizes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=MAX_BIDS, help="devices, aggregator included")
    p.add_argument("--trainers", type=_sizes, default=[MAX_TRAINERS, 32, 8], help="e.g. 128,32,8")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--homes-per-worker", type=int, default=250, help="devices per process")
    p.add_argument("--quick", action="store_true", help="120 devices, 16 and 4 trainers, 2 rounds")
    p.add_argument(
        "--enrol-only",
        action="store_true",
        help="enrol the devices and stop: writes var/bench/enrolment.json",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.quick:
        args.devices, args.trainers, args.rounds, args.homes_per_worker = 120, [16, 4], 2, 40
    if not 2 <= args.devices <= MAX_BIDS:
        p.error(f"--devices must be between 2 and the contract's {MAX_BIDS} bids per task")
    if args.enrol_only:
        result = enrol_run(devices=args.devices)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "enrolment.json").write_text(json.dumps(result, indent=2) + "\n")
        print("\n".join(enrolment_lines(result)))
        print(f"wrote {OUT / 'enrolment.json'}")
        return 0
    if max(args.trainers) > args.devices - 1:
        p.error(f"{max(args.trainers)} trainers need at least {max(args.trainers) + 1} devices")
    if not 1 <= args.rounds <= MAX_ROUNDS:
        p.error(f"--rounds must be between 1 and the contract's {MAX_ROUNDS}")
    try:
        result = run(
            devices=args.devices,
            trainer_counts=args.trainers,
            rounds=args.rounds,
            homes_per_worker=args.homes_per_worker,
        )
    except ValueError as exc:
        print(f"scale run did not finish: {exc}", file=sys.stderr)
        return 1
    write(result, complete=True)
    print(table(result))
    print(f"wrote {OUT / 'scale.json'} and {OUT / 'scale.png'}")
    return 0


def write(result: dict, *, complete: bool) -> None:
    """scale.json and scale.png under var/bench/; ``complete`` False while tasks remain."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "scale.json").write_text(json.dumps({**result, "complete": complete}, indent=2) + "\n")
    scale_plot(result["tasks"], OUT / "scale.png", devices=result["devices"])


def enrolment_lines(result: dict) -> list[str]:
    issued = result["join_tokens"]
    lines = [f"  {issued['devices']} join tokens issued in {issued['seconds']:.1f} s"]
    for e in result["enrolment"]:
        lines.append(f"  enrolled {e['devices']:>4} devices: {e['per_device_s']:.3f} s each")
    return lines


def table(result: dict) -> str:
    lines = [f"{result['devices']} devices in {result['worker_processes']} worker processes"]
    lines += enrolment_lines(result)
    lines.append(
        f"{'trainers':>8} {'bids':>5} {'updates':>7} {'round s':>8} {'updates s':>9} "
        f"{'model s':>7} {'to r1 s':>7} {'gas/round':>10} {'selection gas':>14}"
    )
    for t in result["tasks"]:
        phases = t.get("round_phases_s") or {}
        lines.append(
            f"{t['trainers']:>8} {t['bids']:>5} {min(t['updates_per_round']):>7} "
            f"{t['round_s']:>8.2f} "
            f"{phases.get('model_to_last_update_s', '-'):>9} "
            f"{phases.get('last_update_to_next_model_s', '-'):>7} "
            f"{t['posted_to_round_1_s']:>7.2f} {t['gas_per_round']:>10} "
            f"{t['selection_gas'] or '-':>14}"
        )
    lines.append(
        "  (updates: the fewest aggregated in a round; medians of a steady round: updates s, "
        "from a global model to the last update trained from it mined; model s, from there "
        "to the next model)"
    )
    lines.append(
        "peak memory (MiB): " + ", ".join(f"{n} {m}" for n, m in result["peak_rss_mb"].items())
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
