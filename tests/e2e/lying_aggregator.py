"""An aggregator that lies, for the end-to-end tests only: the local stack's three first
trainers and an aggregator whose worker publishes a wrong global model in round 2 (one value
of the honest aggregate changed), run by tests/e2e/test_lying_aggregator.py in a process of
its own. The trainers' watchers check each global model they train from; the task is
followed until it ends. Writes ``<var>/demo/summary.json`` with what the chain, the
platform's API and the trainers' logs say happened.

    python -m tests.e2e.lying_aggregator --var DIR
    python -m tests.e2e.lying_aggregator worker start --home DIR ...   (the liar's worker)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from core.broker import queues_consumed, url_with
from stack.demo import DEMO_SPEC, follow_task
from stack.devstack import LOCAL_DEVICES, PY, LocalDevice, _config, enrol, say, stack, wait_for

log = logging.getLogger(__name__)

ROUNDS = 3
LIE_IN_ROUND = 2
TRAINERS = LOCAL_DEVICES[1:4]
LIAR = LocalDevice("liar", "gpu", 3 * 10**14, aggregator_price_wei=4 * 10**14)
ROUND_TIMEOUT_S = 300


def lie() -> None:
    """Make this process's aggregator publish a wrong global model in round LIE_IN_ROUND:
    the honest aggregate with its first value moved by one step of the fixed-point scale."""
    from training.serialize import decode, encode
    from worker import aggregator

    honest_publish = aggregator._publish

    def publish(node, *, task_id, round_number, blob, mask, scores=(), exclusions=()):
        if round_number == LIE_IN_ROUND:
            model = decode(blob)
            values = [np.array(v, copy=True) for v in model.values]
            first = values[0].reshape(-1)
            first[0] = first[0] + 1 if first[0] < np.iinfo(np.int32).max else first[0] - 1
            blob = encode(model.header, values)
            log.warning(
                "task %s: publishing a wrong global model for round %s", task_id, round_number
            )
        return honest_publish(
            node,
            task_id=task_id,
            round_number=round_number,
            blob=blob,
            mask=mask,
            scores=scores,
            exclusions=exclusions,
        )

    aggregator._publish = publish


def _liar_up(up: dict, var: Path) -> dict:
    env = up["env"]
    broker_host = urlsplit(env["FLEX_BROKER_URL"]).netloc.rpartition("@")[2]
    home = var / "devices" / LIAR.name
    say("enrolling an aggregator that lies in round 2")
    enrol(LIAR, home=home, web_url=up["web_url"], env=env)
    url = url_with(_config(home)["broker_url"], host=broker_host)
    cmd = [PY, "-m", "tests.e2e.lying_aggregator", "worker", "start", "--home", str(home)]
    up["supervisor"].start(LIAR.name, [*cmd, "--broker-url", url])
    queues = _config(home)["queues"][:1]
    wait_for(
        "the liar's worker",
        lambda: queues_consumed(env["FLEX_BROKER_URL"], queues),
        timeout=300,
        sup=up["supervisor"],
    )
    return {**up, "homes": {**up["homes"], LIAR.name: home}}


def _what_the_buyer_sees(task_id: int, username: str) -> dict:
    """The task as the buyer's API and page show it (the one representation both use)."""
    from django.contrib.auth import get_user_model

    from marketplace.selectors import task_view_get
    from marketplace.serializers import TaskSerializer
    from marketplace.task_page import page_view

    buyer = get_user_model().objects.get(username=username)
    snapshot = TaskSerializer(task_view_get(user=buyer, task_id=task_id)).data
    page = page_view(snapshot)
    return {
        "state": snapshot["state"],
        "challenged_round": snapshot["challenged_round"],
        "challenged_by": snapshot["challenged_by"],
        "challenge_bounty_wei": snapshot["challenge_bounty_wei"],
        "round_note": page["round_note"],
        "steps": [s["label"] for s in page["steps"]],
        "transactions": [row["label"] for row in page["tx_rows"]],
    }


def _chain_facts(task_id: int) -> dict:
    """The challenge and the settlement as the chain's events record them."""
    from chain.events import AggregateChallenged, TaskAborted
    from marketplace import contract

    market = contract.market()
    found = {}
    events = [
        event
        for chunk in market.scan(to_block=market.w3.eth.block_number)
        for event in chunk.events
        if getattr(event, "task_id", None) == task_id
    ]
    for event in events:
        if isinstance(event, AggregateChallenged):
            found["challenge"] = {
                "round": event.round,
                "challenger": event.challenger,
                "verdict": event.verdict.name.lower(),
                "bounty_wei": str(event.bounty_wei),
                "tx_hash": event.tx_hash,
            }
        elif isinstance(event, TaskAborted):
            found["aborted"] = {
                "slashed_wei": str(event.slashed_wei),
                "aggregator_paid_wei": str(event.aggregator_paid_wei),
            }
    info = market.task(task_id=task_id)
    found["bond_wei"] = str(info.aggregator_bond_wei)
    found["state"] = info.state.name.lower()
    return found


def run(var: Path) -> dict:
    spec_fields = {**DEMO_SPEC, "rounds": ROUNDS}
    prices = [d.price_wei for d in TRAINERS]
    budget = ROUNDS * (len(TRAINERS) * max(prices) + LIAR.aggregator_price_wei) * 3 // 2
    with stack(var=var, devices=TRAINERS, quiet_web=True, ephemeral=True) as platform:
        up = _liar_up(platform, var)
        summary = follow_task(
            up,
            out=var / "demo",
            spec_fields=spec_fields,
            trainers=len(TRAINERS),
            budget_wei=budget,
            round_timeout_s=ROUND_TIMEOUT_S,
            # As long as a round: the watcher has all of it to check and challenge on a
            # machine of any speed.
            dispute_window_s=ROUND_TIMEOUT_S,
            timeout_s=1500,
        )
        task_id = summary["task_id"]
        summary["liar"] = _config(up["homes"][LIAR.name])["address"]
        summary["trainers"] = {_config(up["homes"][d.name])["address"]: d.name for d in TRAINERS}
        summary["chain"] = _chain_facts(task_id)
        summary["buyer_sees"] = _what_the_buyer_sees(task_id, up["buyer"]["username"])
    summary["watcher_logs"] = {
        d.name: [
            line
            for line in (var / "log" / f"{d.name}.log").read_text().splitlines()
            if "challenged global model" in line
        ]
        for d in TRAINERS
        if (var / "log" / f"{d.name}.log").exists()
    }
    (var / "demo" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.lying_aggregator")
    parser.add_argument("--var", type=Path, required=True)
    args = parser.parse_args(argv)
    summary = run(args.var.resolve())
    return 0 if summary["state"] == "aborted" else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        from worker.__main__ import main as worker_main

        lie()
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit(main())
