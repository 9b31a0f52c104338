"""The scale benchmark's figures: per task size, and a PNG of round time and gas per round
against the number of trainers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stack.demo import round_phases


def task_figures(summary: dict, *, trainers: int, bids: int, selection_gas: int | None) -> dict:
    """One task's figures from follow_task's summary: the mean steady round, and apart from
    it the time from posting the task to round 1 (bidding window, selection, the initial
    model and round 1 itself); gas per round, updates per round. ValueError when the task did
    not run every round."""
    rounds = summary["rounds"]
    if summary["state"] != "finalized" or not rounds:
        raise ValueError(
            f"the {trainers}-trainer task ended {summary['state']} after {len(rounds)} rounds"
        )
    steady = rounds[1:] or rounds
    return {
        "trainers": trainers,
        "bids": bids,
        "rounds": len(rounds),
        "round_s": round(sum(r["wall_s"] for r in steady) / len(steady), 3),
        "posted_to_round_1_s": rounds[0]["wall_s"],
        "gas_per_round": sum(r["gas"] for r in rounds) // len(rounds),
        "selection_gas": selection_gas,
        "updates_per_round": [r["updates"] for r in rounds],
        "round_phases_s": {k: round(v, 3) for k, v in round_phases(steady).items()},
        "final_accuracy": summary["final_accuracy"],
    }


def scale_plot(tasks: Sequence[dict], path: Path, *, devices: int):
    """Round time and gas per round against trainers, one point per task, written to ``path``
    as a PNG; returns the figure. ValueError without a task to plot."""
    if not tasks:
        raise ValueError("no task to plot: the scale run finished none")
    # The figure alone, without pyplot: no GUI backend, no global state in a benchmark.
    from matplotlib.figure import Figure

    tasks = sorted(tasks, key=lambda t: t["trainers"])
    trainers = [t["trainers"] for t in tasks]
    fig = Figure(figsize=(9, 4), layout="constrained")
    time_ax, gas_ax = fig.subplots(1, 2)
    # Steady rounds only: the time to round 1 is mostly the bidding window, sized to the fleet.
    time_ax.plot(trainers, [t["round_s"] for t in tasks], "o-")
    time_ax.set(xlabel="trainers", ylabel="seconds per round", title="Round time (steady)")
    gas_ax.plot(trainers, [t["gas_per_round"] / 1e6 for t in tasks], "o-", color="tab:red")
    gas_ax.set(xlabel="trainers", ylabel="million gas per round", title="Gas per round")
    for ax in (time_ax, gas_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(trainers, [str(n) for n in trainers])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"FLEX at scale: {devices} devices bidding on each task")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return fig
