"""Real nodes for worker tests: devices enrolled with join tokens, each run as a Celery worker
on its own broker user in a vhost of the test's own, against the session's Anvil; the
platform's side sends them work and reads their signed reports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from celery import Celery
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from kombu import Connection

from core.enrolment import join_message
from core.messages import Deployment, NodeWork, RoundReport, UpdateReport
from core.queues import device_queue, route
from dataplane.access import ChainPolicy
from dataplane.server import DataPlaneServer
from dataplane.tls import node_certificate
from marketplace import contract, services
from marketplace.gateway import REPORTS, report_accept
from marketplace.services import join_token_issue
from tests.conftest import BrokerVhost, broker_vhost_new
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
    log: Path | None = None
    joined: str = ""  # what `worker join` printed

    @property
    def store(self) -> ModelStore:
        return ModelStore(self.home / STORE_DIR)


@dataclass
class Platform:
    """The platform's side of the broker in a test: sends work, reads the devices' reports."""

    vhost: BrokerVhost
    client: Celery
    deployment: Deployment

    def send(self, name: str, kind: type[NodeWork], node: Enrolled, **fields) -> str:
        message = kind.of(self.deployment, node=node.config.address, **fields)
        return self.send_raw(name, node, message.dump())

    def send_raw(self, name: str, node: Enrolled, message: object) -> str:
        """Sends work to ``node``'s queue; returns the Celery task id (there are no results:
        a device reaches nothing but the broker)."""
        queue = device_queue(node.config.device_id)
        return self.client.send_task(name, kwargs={"message": message}, **route(queue)).id

    def reports(self, count: int) -> list[RoundReport | UpdateReport]:
        """The next ``count`` reports the devices published, each checked as the gateway
        checks it (schema, deployment, signature)."""
        found = []
        with Connection(self.vhost.url) as conn, conn.SimpleQueue(REPORTS) as queue:
            for _ in range(count):
                message = queue.get(timeout=RESULT_TIMEOUT)
                found.append(report_accept(message.payload, deployment=self.deployment))
                message.ack()
        return found


def finished(node: Enrolled, task_id: str) -> str:
    """Waits until ``node``'s worker has run the task; its outcome line from the log."""

    def outcome() -> str | None:
        for line in node.log.read_text().splitlines():
            if f"[{task_id}]" in line and ("succeeded" in line or "raised" in line):
                return line
        return None

    return wait_for(outcome)


def wait_for(check, timeout: float = RESULT_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return result


@dataclass
class Cheat:
    """A selected trainer that trains nothing honestly; it serves what it hands in from its
    own store."""

    account: LocalAccount
    store: ModelStore
    plane: DataPlaneServer

    @property
    def address(self) -> str:
        return self.account.address


@pytest.fixture
def cheat_devices(platform_settings, platform_market, tmp_path):
    """``make(*names)``: devices enrolled through the platform's service, each with its own
    data plane, driven by the test itself."""
    with ExitStack() as stack:

        def make(*names: str) -> dict[str, Cheat]:
            made = {}
            for name in names:
                account = Account.create()
                issued = services.join_token_issue(label=name, ttl=timedelta(minutes=10))
                challenge = services.join_challenge_issue(raw_token=issued.raw).challenge
                text = join_message(challenge=challenge, address=account.address)
                signature = account.sign_message(encode_defunct(text=text)).signature
                store = ModelStore(tmp_path / name)
                plane = DataPlaneServer(
                    certificate=node_certificate(tmp_path / f"{name}-tls", common_name=name),
                    store=store,
                    policy=ChainPolicy(market=platform_market, ttl=0),
                    node_address=account.address,
                )
                made[name] = Cheat(account=account, store=store, plane=stack.enter_context(plane))
                services.device_enrol(
                    raw_token=issued.raw,
                    address=account.address,
                    signature="0x" + bytes(signature).hex(),
                    name=name,
                    device_class="cpu",
                    dataplane_url=plane.url,
                    dataplane_cert_sha256=plane.certificate.sha256,
                )
            return made

        yield make


@pytest.fixture
def platform(platform_settings, platform_market) -> Iterator[Platform]:
    """A vhost of its own (no stale message reaches the workers), where devices get their
    users when they enrol, and the reports queue the platform's gateway would consume."""
    vhost = broker_vhost_new("worker")
    platform_settings.FLEX_BROKER_URL = vhost.url
    client = Celery("flex-test", broker=vhost.url)
    client.conf.update(task_serializer="json", accept_content=["json"])
    with Connection(vhost.url) as conn:
        REPORTS(conn.default_channel).declare()
    yield Platform(vhost=vhost, client=client, deployment=contract.deployment_identity())
    client.close()
    vhost.admin.vhost_delete(vhost.name)


def env() -> dict[str, str]:
    return {**os.environ, "FLEX_DEVICE_PASSPHRASE": PASSPHRASE, "PYTHONUNBUFFERED": "1"}


def worker_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m worker ARGS` as a device's owner runs it; with ``check``, it must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 or not check, done.stderr
    return done


def enrol(live_server, home: Path, *args: str, aggregator: bool = False) -> Enrolled:
    token = join_token_issue(label=home.name, ttl=timedelta(minutes=10), may_aggregate=aggregator)
    done = worker_cli(
        "join", live_server.url, token.raw, "--home", str(home), "--no-start", "--light-key", *args
    )
    assert "enrolled as device" in done.stdout
    return Enrolled(home=home, config=device_config.load(home), joined=done.stdout)


@pytest.fixture
def nodes(live_server, platform, tmp_path) -> Iterator[dict[str, Enrolled]]:
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
            # Any text its owner chooses, including what Celery's node names give a meaning.
            "--name",
            "bob@home 50%off",
        ),
    }
    procs = []
    for name, node in enrolled.items():
        node.log = tmp_path / f"{name}.log"
        log = open(node.log, "w")  # noqa: SIM115
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
