"""The local stack's web server (gunicorn, WSGI) runs one worker process per CPU, or as many
as FLEX_WEB_WORKERS says, all serving the one port; a bad count is refused by name."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from chain.launcher import free_port
from core.env import SettingInvalidError
from stack.devstack import web_command, web_workers

ROOT = Path(__file__).resolve().parents[2]


def workers_of(pid: int) -> list[int]:
    """The worker processes server ``pid`` started (its forked children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def test_one_worker_per_cpu_unless_set(monkeypatch):
    monkeypatch.delenv("FLEX_WEB_WORKERS", raising=False)
    assert web_workers() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("FLEX_WEB_WORKERS", "3")
    assert web_workers() == 3


@pytest.mark.parametrize("value", ["0", "many", "-2", "1.5"])
def test_a_bad_worker_count_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv("FLEX_WEB_WORKERS", value)
    with pytest.raises(SettingInvalidError) as exc:
        web_command(host="127.0.0.1", port=free_port())
    assert exc.value.message == (
        f"FLEX_WEB_WORKERS: expected web server processes, 1 or more; got {value!r}"
    )


def test_the_workers_serve_the_site_and_stop_together(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEX_WEB_WORKERS", "2")
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "flexsite.settings",
        "FLEX_VAR_DIR": str(tmp_path),
    }
    with (tmp_path / "web.log").open("w") as log:
        server = subprocess.Popen(
            web_command(host="127.0.0.1", port=port, quiet=True),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    workers: list[int] = []
    try:
        answer = None
        deadline = time.monotonic() + 300  # two Django processes starting on a busy machine
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            with contextlib.suppress(requests.RequestException):
                answer = requests.get(f"http://127.0.0.1:{port}/", timeout=30)
            time.sleep(0.5)
        assert answer is not None, (tmp_path / "web.log").read_text()[-2000:]
        assert answer.status_code == 200
        assert "FLEX" in answer.text
        workers = workers_of(server.pid)
        assert len(workers) == 2
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    # The server waited for its workers: none is left behind.
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
