"""`make run` stopped with Ctrl-C (or SIGTERM) while it comes up: it stops where it is, stops
what it had started, and says so, in one line and no traceback of its set-up commands; it
does not first bring the whole platform up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from chain.launcher import free_port
from stack.backing import stack_vhost_delete
from tests.processes import running

ROOT = Path(__file__).resolve().parents[2]


def test_a_stack_interrupted_while_it_comes_up_stops_there(tmp_path):
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        **{name: str(free_port()) for name in ("FLEX_WEB_PORT", "FLEX_CHAIN_PORT")},
    }
    run = subprocess.Popen(
        [sys.executable, "-m", "stack.devstack", "run", "--var", str(tmp_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        said = []
        for line in run.stdout:
            said.append(line)
            if line.startswith("FlexMarket deployed at"):
                break
        assert any(line.startswith("FlexMarket deployed at") for line in said[-1:]), "".join(said)
        # The contract deployed beside the migration, which is under way; the web server
        # and the devices still to come. Ctrl-C signals the terminal's whole process group.
        os.killpg(run.pid, signal.SIGINT)
        said += run.stdout.readlines()
        code = run.wait(timeout=300)  # waited for, never timed
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        stack_vhost_delete(tmp_path)
    output = "".join(said)

    assert code == 130, output
    assert "[flex] stopping every process" in output
    assert "[flex] stopped before the platform was up" in output
    assert "FLEX is up" not in output
    assert "Traceback" not in output
    # Nothing it started outlives it: soon no process names this stack's directory (one
    # started the moment the signal came goes with the kernel's parent-death signal, and
    # the chain first saves its state).
    deadline = time.monotonic() + 300  # waited for, never timed
    while (left := running(str(tmp_path))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == {}, left
