"""Devices on their own machines: one task across network namespaces the test makes itself
(tests/e2e/across_hosts.py), from enrolment at the platform's bridge address to every party
withdrawing. Where namespaces cannot be made (not root), the run fails and says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from stack.backing import stack_vhost_delete

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def var(tmp_path) -> Iterator[Path]:
    yield tmp_path
    stack_vhost_delete(tmp_path)


def test_a_task_runs_with_every_device_on_a_host_of_its_own(var):
    cmd = [sys.executable, "-m", "tests.e2e.across_hosts", "--var", str(var)]
    env = {"DATABASE_URL": f"sqlite:///{var / 'db.sqlite3'}", "FLEX_SYNC_INTERVAL_S": "0.5"}
    done = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=1500,
    )
    path = var / "hosts" / "summary.json"
    if not path.exists():
        output = f"{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
        pytest.fail(f"the run across hosts wrote no summary:\n{output}")
    summary = json.loads(path.read_text())

    assert done.returncode == 0, done.stdout[-6000:]
    assert summary["state"] == "finalized"
    assert summary["model_verified"] is True
    assert summary["conserved"] is True
    assert [r["updates"] for r in summary["rounds"]] == [3, 3, 3]
    platform = summary["addresses"]["platform"]
    assert not platform.startswith("127.")
    for name, config in summary["devices_config"].items():
        # Each device was told the platform's bridge address, and advertised its own.
        assert urlsplit(config["eth_rpc_url"]).hostname == platform
        assert config["broker"] == platform
        dataplane = urlsplit(config["dataplane_url"])
        assert (dataplane.scheme, dataplane.hostname) == ("https", summary["addresses"][name])
    withdrawals = summary["withdrawals"]
    assert {w["name"] for w in withdrawals.values()} >= {"buyer", "aggregator", "trainer-1"}
    for w in withdrawals.values():
        assert w["settled"] is True, w
        assert w["credit_after_wei"] == "0"
    assert summary["leftovers"] == []
