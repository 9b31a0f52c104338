"""Devices enrolled with join tokens run as real Celery workers on the real RabbitMQ, each
with its own broker user: they bid, train and aggregate a task against a real Anvil, report
signed measurements, every model ID on chain verifies, and bad messages are refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from celery import Celery
from eth_utils import keccak
from kombu import Connection

from chain.events import Role, TaskCreated, TaskState
from chain.launcher import dev_accounts
from chain.selection import positions_of
from core.messages import (
    BidRequest,
    Deployment,
    InitialModelRequest,
    NodeWork,
    RoundAggregateRequest,
    RoundReport,
    RoundTrainRequest,
    UpdateReport,
)
from core.queues import device_queue, route
from dataplane.client import fetch_model
from marketplace import contract
from marketplace.gateway import REPORTS, report_accept
from marketplace.services import join_token_issue
from tests.conftest import BrokerVhost, broker_vhost_new
from training import serialize
from training.spec import TaskSpec
from training.store import ModelStore
from worker import config as device_config
from worker.node import STORE_DIR

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = "correct horse battery staple"
TRAINER_PRICE = 3 * 10**14
AGGREGATOR_PRICE = 2 * 10**14
RESULT_TIMEOUT = 180
SPEC = TaskSpec.from_dict(
    {"model": "digits-mlp", "dataset": "digits-8x8", "rounds": 2, "local_epochs": 2, "seed": 7}
)


@dataclass
class Enrolled:
    home: Path
    config: device_config.DeviceConfig
    log: Path | None = None

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


def _env() -> dict[str, str]:
    return {**os.environ, "FLEX_DEVICE_PASSPHRASE": PASSPHRASE, "PYTHONUNBUFFERED": "1"}


def _enrol(live_server, home: Path, *args: str, aggregator: bool = False) -> Enrolled:
    token = join_token_issue(label=home.name, ttl=timedelta(minutes=10), may_aggregate=aggregator)
    cmd = [sys.executable, "-m", "worker", "join", live_server.url, token.raw, "--home", str(home)]
    done = subprocess.run(
        [*cmd, "--no-start", "--light-key", *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "enrolled as device" in done.stdout
    return Enrolled(home=home, config=device_config.load(home))


@pytest.fixture
def nodes(live_server, platform, tmp_path) -> Iterator[dict[str, Enrolled]]:
    enrolled = {
        "aggregator": _enrol(
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
        "alice": _enrol(
            live_server,
            tmp_path / "alice",
            "--class",
            "cpu",
            "--price-wei",
            str(TRAINER_PRICE),
            "--partition",
            "0/2",
        ),
        "bob": _enrol(
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
        node.log = tmp_path / f"{name}.log"
        log = open(node.log, "w")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "worker", "start", "--home", str(node.home)],
                cwd=ROOT,
                env=_env(),
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


def _stored_id(store: ModelStore, model_id: str) -> str:
    return "0x" + keccak(store.get(model_id)).hex()


def _task(market, *, buyer_index: int, min_trainers: int) -> int:
    now = market.w3.eth.get_block("pending")["timestamp"]
    created = market.create_task(
        sender=dev_accounts(1, start=buyer_index)[0],
        spec_hash=SPEC.hash,
        rounds=SPEC.rounds,
        min_trainers=min_trainers,
        max_trainers=2,
        bidding_ends=now + 3600,
        round_timeout=600,
        budget_wei=10**16,
    )
    return created.first(TaskCreated).task_id


def test_enrolled_devices_bid_train_and_aggregate_through_the_broker(
    nodes, platform, platform_market
):
    market, w3 = platform_market, platform_market.w3
    platform_account = dev_accounts(1)[0]
    buyer = dev_accounts(1, start=5)[0]
    aggregator, trainers = nodes["aggregator"], [nodes["alice"], nodes["bob"]]
    task_id = _task(market, buyer_index=5, min_trainers=2)
    spec = SPEC.as_dict()

    for n in nodes.values():
        platform.send("worker.bid", BidRequest, n, task_id=task_id, spec=spec)
    on_chain = wait_for(lambda: len(b := market.bids(task_id=task_id)) == 3 and b)

    by_device = {b.device: b for b in on_chain}
    assert by_device[aggregator.config.address].role == Role.AGGREGATOR
    for trainer in trainers:
        bid = by_device[trainer.config.address]
        assert bid.role == Role.TRAINER
        assert bid.price_per_round_wei == TRAINER_PRICE
        assert bid.samples > 0

    # A second delivery of the same notification places nothing new.
    again = platform.send("worker.bid", BidRequest, trainers[0], task_id=task_id, spec=spec)
    assert "succeeded" in finished(trainers[0], again)
    assert len(market.bids(task_id=task_id)) == 3

    w3.provider.make_request("evm_increaseTime", [3601])
    w3.provider.make_request("evm_mine", [])
    market.select_nodes(sender=platform_account, task_id=task_id)
    selection = market.selection(task_id=task_id)
    assert selection.aggregator == aggregator.config.address
    assert set(selection.trainers) == {t.config.address for t in trainers}

    platform.send(
        "worker.publish_initial", InitialModelRequest, aggregator, task_id=task_id, spec=spec
    )
    [initial] = platform.reports(1)
    assert (initial.kind, initial.device, initial.round_number) == (
        "round",
        aggregator.config.address,
        0,
    )
    assert initial.model_id == market.global_model(task_id=task_id, round_number=0)
    urls = {t.config.address: t.config.dataplane_url for t in trainers}
    accuracy = []
    for round_number in range(SPEC.rounds):
        common = {"task_id": task_id, "round_number": round_number, "spec": spec}
        platform.send(
            "worker.aggregate", RoundAggregateRequest, aggregator, trainer_urls=urls, **common
        )
        for t in trainers:
            platform.send(
                "worker.train",
                RoundTrainRequest,
                t,
                aggregator_url=aggregator.config.dataplane_url,
                **common,
            )
        reports = platform.reports(3)
        updates = {r.device: r for r in reports if r.kind == "update"}
        [published] = [r for r in reports if r.kind == "round"]
        for trainer in trainers:
            report = updates[trainer.config.address]
            on_chain_id = market.update_of(
                task_id=task_id, round_number=round_number, trainer=trainer.config.address
            )
            assert report.model_id == on_chain_id
            assert report.num_examples > 0
            assert _stored_id(trainer.store, on_chain_id) == on_chain_id
            # The trainer checked the global model it fetched against the chain, and kept it.
            global_id = market.global_model(task_id=task_id, round_number=round_number)
            assert _stored_id(trainer.store, global_id) == global_id
        assert published.device == aggregator.config.address
        assert published.round_number == round_number + 1
        assert published.updates == 2
        info = market.round_info(task_id=task_id, round_number=round_number)
        assert positions_of(info.aggregated_mask) == [0, 1]
        next_id = market.global_model(task_id=task_id, round_number=round_number + 1)
        assert published.model_id == next_id
        assert _stored_id(aggregator.store, next_id) == next_id
        accuracy.append(published.accuracy)

    assert accuracy[-1] > 0.5
    assert market.task(task_id=task_id).state == TaskState.TRAINED

    # Redelivered work after the fact changes nothing on chain and reports nothing.
    late = platform.send(
        "worker.train",
        RoundTrainRequest,
        trainers[0],
        task_id=task_id,
        round_number=1,
        spec=spec,
        aggregator_url=aggregator.config.dataplane_url,
    )
    assert finished(trainers[0], late).endswith("None")

    # The buyer fetches the final model from the aggregator's data plane and checks its ID.
    final_id = market.global_model(task_id=task_id, round_number=SPEC.rounds)
    blob = fetch_model(
        base_url=aggregator.config.dataplane_url,
        model_id=final_id,
        server_address=aggregator.config.address,
        account=buyer,
    )
    assert "0x" + keccak(blob).hex() == final_id
    assert len(serialize.loads(blob, expected_id=final_id)) == 4

    market.finalize(sender=platform_account, task_id=task_id)
    paid = {t.config.address: market.credit_of(account=t.config.address) for t in trainers}
    assert paid == {t.config.address: TRAINER_PRICE * SPEC.rounds for t in trainers}
    assert market.credit_of(account=aggregator.config.address) == AGGREGATOR_PRICE * SPEC.rounds


def test_bad_messages_are_refused_and_the_device_keeps_serving(nodes, platform, platform_market):
    market = platform_market
    alice = nodes["alice"]
    task_id = _task(market, buyer_index=6, min_trainers=1)
    spec = SPEC.as_dict()
    tampered = {**spec, "learning_rate": 5.0}
    elsewhere = Deployment(chain_id=platform.deployment.chain_id, contract="0x" + "11" * 20)

    malformed = platform.send_raw("worker.bid", alice, {"task_id": "one", "spec": []})
    a_string = platform.client.send_task(
        "worker.bid", args=["no message"], **route(device_queue(alice.config.device_id))
    ).id
    foreign = platform.send_raw(
        "worker.bid",
        alice,
        BidRequest.of(elsewhere, node=alice.config.address, task_id=task_id, spec=spec).dump(),
    )
    mismatch = platform.send("worker.bid", BidRequest, alice, task_id=task_id, spec=tampered)
    someone_else = platform.send_raw(
        "worker.bid",
        alice,
        BidRequest.of(
            platform.deployment, node=nodes["bob"].config.address, task_id=task_id, spec=spec
        ).dump(),
    )

    # Each is refused by its name, without a traceback or a retry; nothing reaches the chain.
    assert "raised expected: MessageInvalidError" in finished(alice, malformed)
    assert "raised expected: MessageInvalidError" in finished(alice, a_string)
    assert finished(alice, foreign).endswith("None")
    assert "raised expected: SpecMismatchError" in finished(alice, mismatch)
    assert "raised expected: UnknownNodeError" in finished(alice, someone_else)
    assert "dropped a BidRequest message for chain" in alice.log.read_text()
    assert "Retry in" not in alice.log.read_text()
    assert market.bids(task_id=task_id) == []

    # The worker still serves good work.
    platform.send("worker.bid", BidRequest, alice, task_id=task_id, spec=spec)
    [bid] = wait_for(lambda: market.bids(task_id=task_id))
    assert bid.device == alice.config.address
