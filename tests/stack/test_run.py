"""`make run` stopped with Ctrl-C (or SIGTERM) while it comes up: it stops where it is, stops
what it had started, and says so; it does not first bring the whole platform up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from chain.launcher import free_port
from stack.backing import stack_vhost_delete

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
            if line.startswith("[flex] starting the local chain"):
                break
        # Deploying, migrating, the web server and the devices are all still to come.
        run.send_signal(signal.SIGINT)
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
    # Nothing it started outlives it: no process names this stack's directory.
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert left.stdout == "", left.stdout
