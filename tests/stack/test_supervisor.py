"""A run that is killed leaves nothing behind: every process the stack's supervisor started
is sent SIGTERM by the kernel when the supervisor dies, however it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A supervisor in a process of its own: it starts one child that would sleep for ten minutes,
# prints the child's pid, and waits to be killed.
SUPERVISOR = """
import sys, time
from pathlib import Path
from stack.devstack import Supervisor
sup = Supervisor(env={}, log_dir=Path(sys.argv[1]))
sup.start("sleeper", ["sleep", "600"])
print(sup.procs["sleeper"].pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead: it waits only for its new parent (init) to reap it.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's"
)
def test_processes_of_a_killed_supervisor_stop_with_it(tmp_path):
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(supervisor.stdout.readline())
    assert alive(child)

    supervisor.send_signal(signal.SIGKILL)  # no clean-up code runs
    supervisor.wait()

    deadline = time.monotonic() + 300  # waited for, never timed
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail(f"the supervisor's child {child} outlived it")
