"""The whole platform as separate processes, from a buyer's budget to a verified model:
chain, web, beat, platform worker, an aggregator and five devices, all real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chain.launcher import free_port
from stack.backing import stack_vhost_delete
from stack.devstack import LOCAL_DEVICES
from tests.chain.oracle import trainers_pay
from tests.e2e import BIDDING_WINDOW_S, DISPUTE_WINDOW_S

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TRAINERS, ROUNDS = 3, 3
WINDOWS = ("--bidding-window", str(BIDDING_WINDOW_S), "--dispute-window", str(DISPUTE_WINDOW_S))


@pytest.fixture
def var(tmp_path) -> Iterator[Path]:
    """The demo's state; the broker vhost it makes for itself goes with it."""
    yield tmp_path
    stack_vhost_delete(tmp_path)


def _run_demo(
    var: Path, *args: str, block_time: str = "", rounds: int = ROUNDS
) -> tuple[subprocess.CompletedProcess, dict]:
    """`python -m stack.devstack demo` on free ports, its own broker vhost and SQLite, for a
    task of ``rounds``; with ``block_time``, on a chain that mines a block every so many
    seconds."""
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{var / 'db.sqlite3'}",
        "FLEX_WEB_PORT": str(free_port()),
        "FLEX_CHAIN_PORT": str(free_port()),
        "FLEX_SYNC_INTERVAL_S": "0.5",
        "FLEX_CHAIN_BLOCK_TIME": block_time,
    }
    cmd = [
        sys.executable, "-m", "stack.devstack", "demo", "--var", str(var),
        "--trainers", str(TRAINERS), "--rounds", str(rounds), "--timeout", "300",
        "--min-accuracy", "0.5", *WINDOWS, *args,
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary_path = var / "demo" / "summary.json"
    if not summary_path.exists():
        pytest.fail(f"the demo wrote no summary:\n{done.stdout[-6000:]}\n{done.stderr[-4000:]}")
    return done, json.loads(summary_path.read_text())


def _paid(summary: dict, key: str = "payouts_wei") -> dict[str, int]:
    return {a.lower(): int(v) for a, v in summary[key].items()}


def _conserved(summary: dict) -> bool:
    """Payouts + refund + stakes returned + slashed == budget + stakes, to the wei."""
    out = sum(
        sum(_paid(summary, key).values())
        for key in ("payouts_wei", "stakes_returned_wei", "stakes_slashed_wei")
    )
    put_in = int(summary["budget_wei"]) + sum(_paid(summary, "stakes_wei").values())
    return out + int(summary["refund_wei"]) == put_in


@pytest.mark.parametrize(
    "block_time",
    [
        pytest.param("", id="a-block-per-transaction"),
        # As on a public chain: the round's updates share blocks, and the chain's clock,
        # which the deadlines go by, moves a second at a time.
        pytest.param("1", id="a-block-a-second"),
    ],
)
def test_task_runs_from_budget_to_verified_model(var, block_time):
    done, summary = _run_demo(var, block_time=block_time)

    assert done.returncode == 0, done.stdout[-6000:]
    mining = f"a block every {block_time} s" if block_time else "a block per transaction"
    assert f"({mining}; state in" in done.stdout
    assert summary["state"] == "finalized"
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert all(r["updates"] == TRAINERS for r in summary["rounds"])
    assert all(r["gas"] > 0 for r in summary["rounds"])
    assert summary["model_verified"] is True
    payouts = _paid(summary)
    assert len(payouts) == TRAINERS + 1  # the trainers and the aggregator
    assert _conserved(summary)
    assert int(summary["refund_wei"]) > 0
    # Every selected node delivered and the platform released the other bids: every stake
    # and the bond came back.
    returned = _paid(summary, "stakes_returned_wei")
    assert set(payouts) <= set(returned)
    assert returned == _paid(summary, "stakes_wei")
    assert "round" in done.stdout
    assert "payouts + refund + stakes back + slashed == budget + stakes: True" in done.stdout
    # Then every device paid and the buyer withdraw: each credit back to zero, each account
    # up by exactly its credit less the gas it paid.
    withdrawals = {a.lower(): w for a, w in summary["withdrawals"].items()}
    credited = {a: int(w["credit_wei"]) for a, w in withdrawals.items() if int(w["credit_wei"])}
    buyer = next(a for a, w in withdrawals.items() if w["name"] == "buyer")
    everything = {a: payouts.get(a, 0) + returned.get(a, 0) for a in {*payouts, *returned}}
    assert credited == {**everything, buyer: int(summary["refund_wei"])}
    for w in withdrawals.values():
        assert w["settled"] is True
        assert w["credit_after_wei"] == "0"
        assert int(w["withdrawn_wei"]) == int(w["credit_wei"])
        gained = int(w["wallet_after_wei"]) - int(w["wallet_before_wei"])
        assert gained == int(w["credit_wei"]) - int(w["fee_wei"])


def test_device_killed_mid_task_is_paid_only_for_what_it_delivered(var):
    # The round the dead device misses closes at its timeout; the others must not: on a busy
    # machine round 1, where each device first imports TensorFlow, has taken over 12 s. The
    # device dies after round 1, the task's last round but one (later rounds pass too fast
    # to kill it between two), so that the run waits out one timeout.
    rounds = 2
    done, summary = _run_demo(
        var, "--kill-in-round", str(rounds), "--round-timeout", "40", rounds=rounds
    )

    assert done.returncode == 0, done.stdout[-6000:]
    killed = summary["killed_device"].lower()
    updates = [r["updates"] for r in summary["rounds"]]
    assert updates == [TRAINERS] * (rounds - 1) + [TRAINERS - 1]
    payouts = _paid(summary)
    price = {d.name: d.aggregator_price_wei or d.price_wei for d in LOCAL_DEVICES}
    name = summary["devices"]
    # The dead device delivered every round but the last, is left out of that one, and is
    # paid by the contract's rule for the rounds it delivered (the others for all of theirs);
    # it lost its stake to the buyer.
    contributions = {a.lower(): c for a, c in summary["contributions"].items()}
    assert contributions[killed]["aggregated"] == [True] * (rounds - 1) + [False]
    owed = trainers_pay(contributions)
    assert {a: payouts[a] for a in owed} == owed
    assert payouts[killed] > 0
    returned = _paid(summary, "stakes_returned_wei")
    stakes = _paid(summary, "stakes_wei")
    assert returned == {a: v for a, v in stakes.items() if a != killed}
    slashed = sum(_paid(summary, "stakes_slashed_wei").values())
    assert slashed == stakes[killed]
    aggregator = next(a for a in payouts if name[a] == "aggregator")
    assert payouts[aggregator] == price["aggregator"] * rounds
    assert _conserved(summary)
    assert summary["state"] == "finalized"
    assert summary["model_verified"] is True
