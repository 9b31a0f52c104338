"""The platform worker keeps its PostgreSQL connections from one task to the next, and a
connection the server cut is replaced, not handed to the next task (flexsite.celery)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from core.queues import PLATFORM_QUEUE
from tests.conftest import broker_vhost_new
from tests.postgres import new_database, terminate_connections

ROOT = Path(__file__).resolve().parents[2]
TASKS = 12
# Tasks one after another take turns on the few connections the worker's pool keeps
# (flexsite.settings); never one each.
SHARED_BY = 2
# A cold worker loads Django first; waited for, never asserted.
ANSWER_S = 300


@pytest.fixture
def worker(tmp_path) -> Iterator[tuple[Celery, str]]:
    """A platform worker (prefork, one child) on a database and broker vhost of its own, and a
    Celery client that reads its results."""
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    vhost = broker_vhost_new("conn")
    log = tmp_path / "worker.log"
    with new_database() as database_url, log.open("w") as out:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "flexsite.settings",
            "DATABASE_URL": database_url,
            "FLEX_BROKER_URL": vhost.url,
            "REDIS_URL": redis_url,
            "FLEX_DEV_CHAIN": "true",
        }
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "flexsite",
                "worker",
                "-Q",
                PLATFORM_QUEUE,
                "-c",
                "1",
                "-I",
                "tests.marketplace.probe_tasks",
                "-n",
                "conn@%h",
                "--loglevel",
                "INFO",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        client = Celery("probe", broker=vhost.url, backend=redis_url)
        try:
            yield client, database_url
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            client.close()
            vhost.admin.vhost_delete(vhost.name)
    if proc.returncode not in (0, -15):
        pytest.fail(f"the worker exited with {proc.returncode}:\n{log.read_text()[-4000:]}")


def backend_pid(client: Celery) -> int:
    return client.send_task("tests.backend_pid", queue=PLATFORM_QUEUE).get(timeout=ANSWER_S)


def test_tasks_reuse_the_workers_pooled_connections_and_replace_cut_ones(worker):
    client, database_url = worker
    pids = [backend_pid(client) for _ in range(TASKS)]
    # Celery's own fix-up would close the pool at every task: a new server process each.
    assert len(set(pids)) <= TASKS // SHARED_BY, (
        f"{TASKS} tasks in a row ran on {len(set(pids))} PostgreSQL server processes: {pids}"
    )

    assert terminate_connections(database_url) >= 1
    after = [backend_pid(client) for _ in range(TASKS)]
    assert not set(after) & set(pids), "a task ran on a connection the server had cut"
    assert len(set(after)) <= TASKS // SHARED_BY
