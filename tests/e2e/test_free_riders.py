"""Honest pay on the whole platform as separate processes: a free rider and a trainer whose data
is noise take part in a task beside three honest trainers (tests/e2e/free_riders.py); both
earn next to nothing, the honest trainers are paid by their scores, and the model is as good
as the honest trainers alone make it."""

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
from tests.chain.oracle import trainers_pay
from training.scoring import FLOOR, FULL_SCALE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 3


@pytest.fixture
def var(tmp_path) -> Iterator[Path]:
    yield tmp_path
    stack_vhost_delete(tmp_path)


@pytest.mark.timeout(2700)
def test_free_rider_and_noise_earn_next_to_nothing_and_honest_trainers_are_paid_by_score(var):
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{var / 'db.sqlite3'}",
        "FLEX_WEB_PORT": str(free_port()),
        "FLEX_CHAIN_PORT": str(free_port()),
        "FLEX_SYNC_INTERVAL_S": "0.5",
    }
    cmd = [sys.executable, "-m", "tests.e2e.free_riders", "--var", str(var)]
    done = subprocess.run(
        [*cmd, "--rounds", str(ROUNDS)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    path = var / "demo" / "summary.json"
    if not path.exists():
        pytest.fail(f"no summary:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}")
    summary = json.loads(path.read_text())
    assert done.returncode == 0, done.stdout[-6000:]
    assert summary["state"] == "finalized"
    assert summary["conserved"] is True, (summary["payouts_wei"], summary["refund_wei"])
    assert summary["model_verified"] is True

    freerider, noisy = summary["cheats"]["freerider"], summary["cheats"]["noisy"]
    contributions = summary["contributions"]
    prices = {a: int(p) for a, p in summary["prices_wei"].items()}
    paid = {a: int(c["paid_wei"]) for a, c in contributions.items()}
    honest = [a for a in contributions if a not in (freerider, noisy)]
    assert len(honest) == 3
    # The free rider's copy is left out of every round and earns nothing.
    assert contributions[freerider]["aggregated"] == [False] * ROUNDS
    assert paid[freerider] == 0
    # The noise is aggregated (it is a valid update) and scored at the floor, and earns a
    # sliver. Its draw (seeded by its address, new each run) may still lower the validation
    # loss a little in a round by chance: then it scores just above the floor, far below the
    # round's best.
    noise_scores = contributions[noisy]["scores"]
    assert sum(s == FLOOR for s in noise_scores) >= ROUNDS - 1, noise_scores
    assert max(noise_scores) < FULL_SCALE // 8, noise_scores
    assert 0 < paid[noisy] < ROUNDS * prices[noisy] // 10
    # Honest trainers are scored above the floor (a non-IID one may sink to it in a round
    # where its data adds nothing on the buyer's set) and paid by those scores.
    for a in honest:
        assert sum(s > FLOOR for s in contributions[a]["scores"]) >= ROUNDS - 1, contributions
        assert paid[a] > 5 * paid[noisy], (paid, contributions)
    # Each is paid exactly what the contract's rule gives for its rounds' masks and scores
    # (tests/chain/oracle.py: a pool of half the prices, shared by score, each share capped
    # at its price, what the caps hold back going to the others by headroom).
    positions = sorted(c["position"] for c in contributions.values())
    assert positions == list(range(len(contributions)))
    assert paid == trainers_pay(contributions)
    # The model is no worse than the honest trainers' alone: the noise is aggregated, but at
    # its score's weight (training.scoring.fedavg_weight), 1/64 of its samples.
    final = summary["final_accuracy"]
    assert final >= summary["baseline_accuracy"], (
        final,
        summary["baseline_accuracy"],
    )
    assert all(r["updates"] == 4 for r in summary["rounds"])
