"""The e2e workload on Flower's simulation engine: what a round costs with no chain, broker or
network in its loop, on the same machine as the platform's run (bench.e2e runs it beside the
platform and compares the two).

Runs in its own virtualenv (.venv-flower, from requirements-flower.txt; `make bench` sets it
up): Flower pins a protobuf older than the one FLEX runs. It imports only FLEX's training
code, so each client's fit is the devices' own ``train_round`` on the same partitions.

    .venv-flower/bin/python -m bench.flower --spec '{"model": ...}' \\
        --partition 0/5 ... --out var/bench/flower-run.json

FedAvg takes every client's update each round, and the server evaluates the global model on
the test set after each, as the platform's aggregator and buyer see it. A round is timed from
one round's fit instructions to the next's (the last to its evaluation); the first WARM_UP
rounds are left out, while Ray starts its actors and TensorFlow traces each client's model.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# Rounds left out of the figures: Ray's actors start, and each traces its fits, in these.
WARM_UP = 3


def simulate(spec_fields: dict, partitions: list[tuple[int, int]]) -> dict:
    """Run ``spec_fields``'s rounds on ``partitions`` ((index, count) each, a client each)
    in Flower's simulation; what each round took, its slowest fit and the accuracy."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    import numpy as np
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    from bench.procs import tree_cpu_seconds
    from training.catalogue import initial_weights
    from training.datasets import load_partition
    from training.evaluate import evaluate
    from training.local import train_round
    from training.spec import TaskSpec

    spec = TaskSpec.from_dict(spec_fields)
    loaded: dict[int, object] = {}  # per actor process: each partition is loaded once

    class Trainer(NumPyClient):
        def __init__(self, data: object) -> None:
            self.data = data

        def fit(self, parameters, config):
            started = time.perf_counter()
            result = train_round(
                spec=spec,
                weights=[np.asarray(p) for p in parameters],
                data=self.data,
                round_number=int(config["round"]),
            )
            fit_s = time.perf_counter() - started
            return result.weights, result.num_examples, {"fit_s": fit_s}

    def client_fn(context: Context):
        k = int(context.node_config["partition-id"])
        if k not in loaded:
            index, count = partitions[k]
            loaded[k] = load_partition(
                schema=spec.dataset, index=index, count=count, alpha=0.5, seed=0
            )
        return Trainer(loaded[k]).to_client()

    starts: list[float] = []
    # CPU seconds of this process and every one below it (Ray's), as each round starts.
    cpu_at: list[float] = []
    slowest: list[float] = []
    accuracy: list[float] = []

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            starts.append(time.perf_counter())
            cpu_at.append(tree_cpu_seconds(os.getpid()))
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} client(s) failed")
            slowest.append(max(float(r.metrics["fit_s"]) for _, r in results))
            return super().aggregate_fit(server_round, results, failures)

    def evaluate_fn(server_round, parameters, config):
        if server_round:  # 0 is the initial model
            accuracy.append(evaluate(spec=spec, weights=parameters).accuracy)
            if server_round == spec.rounds:
                starts.append(time.perf_counter())
                cpu_at.append(tree_cpu_seconds(os.getpid()))
        return 0.0, {}

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = TimedFedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=len(partitions),
            min_available_clients=len(partitions),
            initial_parameters=ndarrays_to_parameters(initial_weights(spec=spec)),
            evaluate_fn=evaluate_fn,
            on_fit_config_fn=lambda server_round: {"round": server_round - 1},
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=spec.rounds))

    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=len(partitions),
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    if len(accuracy) != spec.rounds or len(starts) != spec.rounds + 1:
        raise RuntimeError(f"the simulation ran {len(accuracy)} of {spec.rounds} rounds")
    rounds_s = np.diff(starts)
    skip = min(WARM_UP, spec.rounds - 1)
    round_s = float(np.mean(rounds_s[skip:]))
    fit_s = float(np.mean(slowest[skip:]))
    return {
        "round_s": round(round_s, 4),
        "slowest_fit_s": round(fit_s, 4),
        "overhead_round_s": round(round_s - fit_s, 4),
        "cpu_s_per_round": round((cpu_at[-1] - cpu_at[skip]) / (spec.rounds - skip), 4),
        "rounds_timed": spec.rounds - skip,
        "accuracy": accuracy[-1],
        "accuracy_by_round": [round(a, 4) for a in accuracy],
    }


def partition(text: str) -> tuple[int, int]:
    """INDEX/COUNT, as --partition takes it: a client's slice of the dataset."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not INDEX/COUNT, e.g. 0/5") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"{text!r}: the index must be from 0 to COUNT - 1")
    return index, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flower", description=__doc__)
    parser.add_argument("--spec", required=True, type=json.loads, help="the task's spec, as JSON")
    parser.add_argument(
        "--partition",
        action="append",
        required=True,
        type=partition,
        help="INDEX/COUNT, one per client",
    )
    parser.add_argument("--out", required=True, type=Path, help="where the figures go (JSON)")
    args = parser.parse_args(argv)
    result = simulate(args.spec, args.partition)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
