"""Real nodes for worker tests: devices enrolled with join tokens, run as Celery workers on the
real Redis against the session's Anvil, and a way to send them work."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from celery import Celery

from core.queues import device_queue
from marketplace.services import join_token_issue
from training.store import ModelStore
from worker import config as device_config
from worker.node import STORE_DIR

ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = "correct horse battery staple"
TRAINER_PRICE = 3 * 10**14
AGGREGATOR_PRICE = 2 * 10**14
RESULT_TIMEOUT = 180


@dataclass
class Enrolled:
    home: Path
    config: device_config.DeviceConfig

    @property
    def store(self) -> ModelStore:
        return ModelStore(self.home / STORE_DIR)


@pytest.fixture
def broker(platform_settings) -> Iterator[Celery]:
    """A client of a Redis database of its own on the real server, so that no stale message
    reaches the workers; devices learn its URL when they enrol."""
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0] + "/14"
    redis.Redis.from_url(url).flushdb()
    platform_settings.REDIS_URL = url
    client = Celery("flex-test", broker=url, backend=url)
    client.conf.update(task_serializer="json", accept_content=["json"])
    yield client
    client.close()


def env() -> dict[str, str]:
    return {**os.environ, "FLEX_DEVICE_PASSPHRASE": PASSPHRASE, "PYTHONUNBUFFERED": "1"}


def enrol(live_server, home: Path, *args: str, aggregator: bool = False) -> Enrolled:
    token = join_token_issue(label=home.name, ttl=timedelta(minutes=10), may_aggregate=aggregator)
    cmd = [sys.executable, "-m", "worker", "join", live_server.url, token.raw, "--home", str(home)]
    done = subprocess.run(
        [*cmd, "--no-start", "--light-key", *args],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "enrolled as device" in done.stdout
    return Enrolled(home=home, config=device_config.load(home))


@pytest.fixture
def nodes(live_server, broker, tmp_path) -> Iterator[dict[str, Enrolled]]:
    enrolled = {
        "aggregator": enrol(
            live_server,
            tmp_path / "aggregator",
            "--class",
            "gpu",
            "--price-wei",
            str(TRAINER_PRICE),
            "--aggregator-price-wei",
            str(AGGREGATOR_PRICE),
            aggregator=True,
        ),
        "alice": enrol(
            live_server,
            tmp_path / "alice",
            "--class",
            "cpu",
            "--price-wei",
            str(TRAINER_PRICE),
            "--partition",
            "0/2",
        ),
        "bob": enrol(
            live_server,
            tmp_path / "bob",
            "--class",
            "jetson",
            "--price-wei",
            str(TRAINER_PRICE),
            "--partition",
            "1/2",
        ),
    }
    procs = []
    for name, node in enrolled.items():
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "worker", "start", "--home", str(node.home)],
                cwd=ROOT,
                env=env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    yield enrolled
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    for name in enrolled:
        sys.stderr.write(f"--- {name} ---\n{(tmp_path / f'{name}.log').read_text()[-4000:]}\n")


def send(client: Celery, name: str, node: Enrolled, **kwargs):
    return client.send_task(
        name,
        kwargs={"node_address": node.config.address, **kwargs},
        queue=device_queue(node.config.device_id),
    )
