"""A lying aggregator on the whole platform as separate processes (tests/e2e/lying_aggregator.py):
it publishes a wrong global model in round 2; a trainer's watcher proves it on chain within
the dispute window, the contract slashes the bond and aborts the task, every wei is accounted
for, and the buyer's page says what happened."""

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
from tests.e2e.lying_aggregator import LIE_IN_ROUND

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def var(tmp_path) -> Iterator[Path]:
    yield tmp_path
    stack_vhost_delete(tmp_path)


# A whole stack, three rounds: a busy machine is waited for, never timed.
@pytest.mark.timeout(3000)
def test_a_wrong_aggregate_is_challenged_by_a_trainer_and_the_aggregator_slashed(var):
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{var / 'db.sqlite3'}",
        "FLEX_WEB_PORT": str(free_port()),
        "FLEX_CHAIN_PORT": str(free_port()),
        "FLEX_SYNC_INTERVAL_S": "0.5",
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.e2e.lying_aggregator", "--var", str(var)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=2700,
    )
    path = var / "demo" / "summary.json"
    if not path.exists():
        pytest.fail(f"no summary:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}")
    summary = json.loads(path.read_text())
    assert done.returncode == 0, done.stdout[-6000:]

    chain = summary["chain"]
    challenge = chain["challenge"]
    # The wrong model is the one proven wrong, by a trainer of the task, for a quarter of the
    # bond; the chain ends the task aborted.
    assert challenge["round"] == LIE_IN_ROUND
    assert challenge["verdict"] == "wrong_value"
    assert challenge["challenger"] in summary["trainers"]
    assert int(challenge["bounty_wei"]) == int(chain["bond_wei"]) // 4
    assert chain["state"] == summary["state"] == "aborted"
    # The aggregator is paid for the one honest aggregate before the lie, never its bond back.
    liar = summary["liar"]
    assert summary["stakes_returned_wei"].get(liar) is None
    assert int(chain["aborted"]["slashed_wei"]) >= int(chain["bond_wei"])
    # Payouts (bounty included) + refund + stakes returned + slashed == budget + deposits.
    assert summary["conserved"] is True, (summary["payouts_wei"], summary["refund_wei"])
    assert int(summary["payouts_wei"][challenge["challenger"]]) > 0

    # The trainer's worker says it sent the challenge.
    name = summary["trainers"][challenge["challenger"]]
    assert any(f"of round {LIE_IN_ROUND}" in line for line in summary["watcher_logs"][name]), (
        summary["watcher_logs"]
    )

    # The buyer's page and API show it.
    seen = summary["buyer_sees"]
    assert seen["state"] == "aborted"
    assert seen["challenged_round"] == LIE_IN_ROUND
    assert seen["challenged_by"] == challenge["challenger"]
    assert seen["challenge_bounty_wei"] == challenge["bounty_wei"]
    assert "Aggregate challenged" in seen["steps"]
    assert f"aggregate of round {LIE_IN_ROUND} challenged: aggregator slashed" == seen["round_note"]
    assert any(label.startswith("Aggregate challenged") for label in seen["transactions"])
