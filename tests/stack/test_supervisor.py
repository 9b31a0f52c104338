"""A run that is killed leaves nothing behind: every process the stack's supervisor started
is sent SIGTERM by the kernel when the supervisor dies, however it dies. A run that is
stopped stops in order: each process stops its own children, then nothing of it is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stack.devstack import Supervisor

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


# A worker in the manner of Celery's: on SIGTERM it lets the task in hand (a child in its
# process group) finish, then exits; a second child it never waits for stays behind.
WORKER = """
import signal, subprocess, sys, time
task = subprocess.Popen([sys.executable, "-c",
    "import sys, time; time.sleep(2); open(sys.argv[1], 'w').write('done')", sys.argv[1]])
straggler = subprocess.Popen(["sleep", "600"])

def stop(*_):
    task.wait()
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
print(straggler.pid, flush=True)
time.sleep(600)
"""


def test_stopping_lets_a_worker_finish_its_task_then_clears_its_group(tmp_path):
    done = tmp_path / "done"
    sup = Supervisor(env=dict(os.environ), log_dir=tmp_path / "logs")
    sup.start("worker", [sys.executable, "-c", WORKER, str(done)])
    log = tmp_path / "logs" / "worker.log"
    deadline = time.monotonic() + 300  # waited for, never timed
    while not (log.exists() and log.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    straggler = int(log.read_text().split()[0])

    sup.stop(timeout=300)

    # The task in hand was not killed with its worker: it finished.
    assert done.read_text() == "done"
    while alive(straggler) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(straggler), "a process left in the worker's group outlived the stop"


# A process that, on SIGTERM, waits ``delay`` seconds, notes its name in a file and exits.
NOTES_ITS_STOP = """
import signal, sys, time
name, notes, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])

def stop(*_):
    time.sleep(delay)
    with open(notes, "a") as f:
        f.write(name + "\\n")
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
print("up", flush=True)
time.sleep(600)
"""


def test_the_first_process_started_stops_after_all_the_others(tmp_path):
    """The chain starts first and every other process talks to it: stopping the stack
    stops it last, so that no device logs losing it on its way out (even one that is slow
    to stop)."""
    notes = tmp_path / "stopped"
    sup = Supervisor(env=dict(os.environ), log_dir=tmp_path / "logs")
    for name, delay in (("chain", "0"), ("web", "0"), ("device", "1")):
        sup.start(name, [sys.executable, "-c", NOTES_ITS_STOP, name, str(notes), delay])
    deadline = time.monotonic() + 300  # waited for, never timed
    for name in ("chain", "web", "device"):
        log = tmp_path / "logs" / f"{name}.log"
        while not (log.exists() and log.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)

    sup.stop(timeout=300)

    stopped = notes.read_text().split()
    assert sorted(stopped[:2]) == ["device", "web"]
    assert stopped[2] == "chain"


# A process that starts a child (as a Celery worker starts its pool) and prints its pid.
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


def _autogroup_nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="no Linux autogroups")
def test_bookkeeping_yields_as_a_whole_and_the_rest_does_not(tmp_path):
    """The platform's workers run at a lower priority than the devices they share a host with,
    pool included; what people wait on (the web server) and the devices do not."""
    sup = Supervisor(env=dict(os.environ), log_dir=tmp_path / "logs")
    sup.start("platform", [sys.executable, "-c", PARENT], niceness=5)
    sup.start("web", [sys.executable, "-c", PARENT])
    try:
        deadline = time.monotonic() + 300  # waited for, never timed
        pool = {}
        for name in ("platform", "web"):
            log = tmp_path / "logs" / f"{name}.log"
            while not (log.exists() and log.read_text().strip()) and time.monotonic() < deadline:
                time.sleep(0.1)
            pool[name] = int(log.read_text().split()[0])
        assert _autogroup_nice(sup.procs["platform"].pid) == 5
        assert _autogroup_nice(pool["platform"]) == 5
        assert _autogroup_nice(sup.procs["web"].pid) == 0
        assert _autogroup_nice(pool["web"]) == 0
    finally:
        sup.stop(timeout=300)
