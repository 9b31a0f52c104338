"""One task with cheats among its trainers, run by tests/e2e/test_free_riders.py in a process of
its own (Django set up for the stack's database): the local stack's aggregator and three
honest trainers, plus a free rider and a trainer whose data is noise (tests.e2e.misbehaving),
each enrolled through the real join flow and run as its own worker. The task runs to
finalized; beside it, the same spec is trained as a plain FedAvg loop on the honest
trainers' data alone. Writes ``<var>/demo/summary.json`` with ``baseline_accuracy`` and the
cheats' addresses.

    python -m tests.e2e.free_riders --var DIR --rounds N
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from urllib.parse import urlsplit

from core.broker import queues_consumed, url_with
from stack.demo import DEMO_SPEC, follow_task
from stack.devstack import LOCAL_DEVICES, PY, LocalDevice, _config, enrol, say, stack, wait_for
from tests.e2e import BIDDING_WINDOW_S, DISPUTE_WINDOW_S

HONEST = LOCAL_DEVICES[:4]  # the aggregator and three trainers, partitions 0..2 of 5
CHEATS = (
    LocalDevice("freerider", "cpu", 2 * 10**14, partition=3),
    LocalDevice("noisy", "cpu", 2 * 10**14, partition=4),
)


def _cheats_up(up: dict, var: Path) -> dict:
    env = up["env"]
    broker_host = urlsplit(env["FLEX_BROKER_URL"]).netloc.rpartition("@")[2]
    homes = dict(up["homes"])
    for device in CHEATS:
        home = homes[device.name] = var / "devices" / device.name
        say(f"enrolling {device.name}, a device that cheats")
        enrol(device, home=home, web_url=up["web_url"], env=env)
        url = url_with(_config(home)["broker_url"], host=broker_host)
        behaviour = "freeride" if device.name == "freerider" else "noise"
        cmd = [PY, "-m", "tests.e2e.misbehaving", behaviour, "start", "--home", str(home)]
        up["supervisor"].start(device.name, [*cmd, "--broker-url", url])
    queues = [_config(homes[d.name])["queues"][0] for d in CHEATS]
    wait_for(
        "the cheats' workers",
        lambda: queues_consumed(env["FLEX_BROKER_URL"], queues),
        timeout=300,
        sup=up["supervisor"],
    )
    return {**up, "homes": homes}


def baseline(*, spec_fields: dict) -> float:
    """Final test accuracy of the same spec as a plain FedAvg loop over the honest trainers'
    partitions, with the platform's fixed-point updates and aggregates."""
    from training.aggregation import FedAvg, Update
    from training.catalogue import initial_weights
    from training.datasets import load_partition
    from training.evaluate import evaluate
    from training.fixedpoint import dequantize, quantize
    from training.local import train_round
    from training.spec import TaskSpec
    from worker.config import Partition

    spec = TaskSpec.from_dict(spec_fields)
    alpha, seed = Partition(index=0, count=1).alpha, Partition(index=0, count=1).seed
    data = [
        load_partition(schema=spec.dataset, index=d.partition, count=5, alpha=alpha, seed=seed)
        for d in HONEST
        if not d.aggregator
    ]
    weights = quantize(initial_weights(spec=spec))
    for round_number in range(spec.rounds):
        updates = [
            Update(
                weights=quantize(
                    train_round(
                        spec=spec, weights=dequantize(weights), data=d, round_number=round_number
                    ).weights
                ),
                num_examples=len(d),
            )
            for d in data
        ]
        weights = FedAvg().aggregate(updates)
    return evaluate(spec=spec, weights=dequantize(weights)).accuracy


def run(var: Path, *, rounds: int) -> dict:
    spec_fields = {**DEMO_SPEC, "rounds": rounds}
    trainers = len(HONEST) - 1 + len(CHEATS)
    prices = [d.price_wei for d in (*HONEST, *CHEATS) if not d.aggregator]
    aggregator_price = max(d.aggregator_price_wei for d in HONEST if d.aggregator)
    budget = rounds * (trainers * max(prices) + aggregator_price) * 3 // 2
    with stack(var=var, devices=HONEST, quiet_web=True, ephemeral=True) as platform:
        up = _cheats_up(platform, var)
        summary = follow_task(
            up,
            out=var / "demo",
            spec_fields=spec_fields,
            trainers=trainers,
            budget_wei=budget,
            round_timeout_s=300,
            bidding_window_s=BIDDING_WINDOW_S,
            dispute_window_s=DISPUTE_WINDOW_S,
            timeout_s=1500,
        )
        summary["cheats"] = {d.name: _config(up["homes"][d.name])["address"] for d in CHEATS}
        summary["prices_wei"] = {
            _config(up["homes"][d.name])["address"]: str(d.price_wei)
            for d in (*HONEST, *CHEATS)
            if not d.aggregator
        }
    summary["baseline_accuracy"] = baseline(spec_fields=spec_fields)
    (var / "demo" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.free_riders")
    parser.add_argument("--var", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    summary = run(args.var.resolve(), rounds=args.rounds)
    return 0 if summary["state"] == "finalized" else 1


if __name__ == "__main__":
    sys.exit(main())
