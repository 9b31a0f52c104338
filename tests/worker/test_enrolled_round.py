"""Devices enrolled with join tokens run as real Celery workers on the real Redis: they bid,
train and aggregate a task against a real Anvil, and every model ID on chain verifies."""

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
from eth_utils import keccak

from chain.events import Role, TaskCreated, TaskState
from chain.launcher import dev_accounts
from chain.selection import positions_of
from core.queues import device_queue
from dataplane.client import fetch_model
from marketplace.models import Device
from marketplace.services import join_token_issue
from training import serialize
from training.spec import TaskSpec
from training.store import ModelStore
from worker import config as device_config
from worker.node import STORE_DIR
from worker.trainer import SpecMismatchError

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
def nodes(live_server, broker, tmp_path) -> Iterator[dict[str, Enrolled]]:
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
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115
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


def _send(client: Celery, name: str, node: Enrolled, **kwargs):
    return client.send_task(
        name,
        kwargs={"node_address": node.config.address, **kwargs},
        queue=device_queue(node.config.device_id),
    )


def _stored_id(store: ModelStore, model_id: str) -> str:
    return "0x" + keccak(store.get(model_id)).hex()


def test_enrolled_devices_bid_train_and_aggregate_through_celery(nodes, broker, platform_market):
    market, w3 = platform_market, platform_market.w3
    platform, buyer = dev_accounts(1)[0], dev_accounts(1, start=5)[0]
    aggregator, trainers = nodes["aggregator"], [nodes["alice"], nodes["bob"]]
    now = w3.eth.get_block("pending")["timestamp"]
    budget = 10**16
    created = market.create_task(
        sender=buyer,
        spec_hash=SPEC.hash,
        rounds=SPEC.rounds,
        min_trainers=2,
        max_trainers=2,
        bidding_ends=now + 3600,
        round_timeout=600,
        budget_wei=budget,
    )
    task_id = created.first(TaskCreated).task_id
    spec = SPEC.as_dict()

    bids = [
        _send(broker, "worker.place_bid", n, task_id=task_id, spec=spec) for n in nodes.values()
    ]
    decisions = [b.get(timeout=RESULT_TIMEOUT) for b in bids]

    assert decisions[0]["role"] == "aggregator"
    assert [d["role"] for d in decisions[1:]] == ["trainer", "trainer"]
    on_chain = {b.device: b for b in market.bids(task_id=task_id)}
    assert on_chain[aggregator.config.address].role == Role.AGGREGATOR
    for trainer, decision in zip(trainers, decisions[1:], strict=True):
        bid = on_chain[trainer.config.address]
        assert bid.price_per_round_wei == TRAINER_PRICE
        assert bid.samples == decision["samples"] > 0

    # A second delivery of the same notification places nothing new.
    again = _send(broker, "worker.place_bid", trainers[0], task_id=task_id, spec=spec)
    assert again.get(timeout=RESULT_TIMEOUT)["samples"] == decisions[1]["samples"]
    assert len(market.bids(task_id=task_id)) == 3

    w3.provider.make_request("evm_increaseTime", [3601])
    w3.provider.make_request("evm_mine", [])
    market.select_nodes(sender=platform, task_id=task_id)
    selection = market.selection(task_id=task_id)
    assert selection.aggregator == aggregator.config.address
    assert set(selection.trainers) == {t.config.address for t in trainers}

    initial = _send(broker, "worker.publish_initial_model", aggregator, task_id=task_id, spec=spec)
    assert initial.get(timeout=RESULT_TIMEOUT)["round"] == 0
    # What the platform's lifecycle sends: each peer's URL and certificate as registered.
    devices = {d.address: d for d in Device.objects.all()}
    urls = {t.config.address: devices[t.config.address].dataplane_url for t in trainers}
    certs = {t.config.address: devices[t.config.address].dataplane_cert_sha256 for t in trainers}
    aggregator_cert = devices[aggregator.config.address].dataplane_cert_sha256
    accuracy = []
    for round_number in range(SPEC.rounds):
        aggregated = _send(
            broker,
            "worker.aggregate_round",
            aggregator,
            task_id=task_id,
            round_number=round_number,
            spec=spec,
            trainer_urls=urls,
            trainer_certs_sha256=certs,
        )
        trained = [
            _send(
                broker,
                "worker.train_round",
                t,
                task_id=task_id,
                round_number=round_number,
                spec=spec,
                aggregator_url=aggregator.config.dataplane_url,
                aggregator_cert_sha256=aggregator_cert,
            )
            for t in trainers
        ]
        for trainer, result in zip(trainers, trained, strict=True):
            update_id = result.get(timeout=RESULT_TIMEOUT)["update_id"]
            on_chain_id = market.update_of(
                task_id=task_id, round_number=round_number, trainer=trainer.config.address
            )
            assert update_id == on_chain_id
            assert _stored_id(trainer.store, on_chain_id) == on_chain_id
            # The trainer checked the global model it fetched against the chain, and kept it.
            global_id = market.global_model(task_id=task_id, round_number=round_number)
            assert _stored_id(trainer.store, global_id) == global_id
        summary = aggregated.get(timeout=RESULT_TIMEOUT)
        assert summary["round"] == round_number + 1
        assert summary["updates"] == 2
        assert summary["rejected"] == {}
        info = market.round_info(task_id=task_id, round_number=round_number)
        assert positions_of(info.aggregated_mask) == [0, 1]
        published = market.global_model(task_id=task_id, round_number=round_number + 1)
        assert summary["model_id"] == published
        assert _stored_id(aggregator.store, published) == published
        accuracy.append(summary["accuracy"])

    assert accuracy[-1] > 0.5
    task = market.task(task_id=task_id)
    assert task.state == TaskState.TRAINED

    # Redelivered work after the fact changes nothing on chain.
    late = _send(
        broker,
        "worker.train_round",
        trainers[0],
        task_id=task_id,
        round_number=1,
        spec=spec,
        aggregator_url=aggregator.config.dataplane_url,
        aggregator_cert_sha256=aggregator_cert,
    )
    assert late.get(timeout=RESULT_TIMEOUT) is None

    # The buyer fetches the final model from the aggregator's data plane and checks its ID.
    final_id = market.global_model(task_id=task_id, round_number=SPEC.rounds)
    blob = fetch_model(
        base_url=aggregator.config.dataplane_url,
        cert_sha256=aggregator_cert,
        model_id=final_id,
        server_address=aggregator.config.address,
        account=buyer,
    )
    assert "0x" + keccak(blob).hex() == final_id
    assert len(serialize.loads(blob, expected_id=final_id)) == 4

    market.finalize(sender=platform, task_id=task_id)
    paid = {t.config.address: market.credit_of(account=t.config.address) for t in trainers}
    assert paid == {t.config.address: TRAINER_PRICE * SPEC.rounds for t in trainers}
    assert market.credit_of(account=aggregator.config.address) == AGGREGATOR_PRICE * SPEC.rounds


def test_spec_that_does_not_match_the_chain_is_refused(nodes, broker, platform_market):
    market, w3 = platform_market, platform_market.w3
    buyer = dev_accounts(1, start=6)[0]
    now = w3.eth.get_block("pending")["timestamp"]
    created = market.create_task(
        sender=buyer,
        spec_hash=SPEC.hash,
        rounds=SPEC.rounds,
        min_trainers=1,
        max_trainers=2,
        bidding_ends=now + 3600,
        round_timeout=600,
        budget_wei=10**16,
    )
    task_id = created.first(TaskCreated).task_id
    tampered = {**SPEC.as_dict(), "learning_rate": 5.0}

    result = _send(broker, "worker.place_bid", nodes["alice"], task_id=task_id, spec=tampered)

    with pytest.raises(SpecMismatchError):
        result.get(timeout=RESULT_TIMEOUT)
    assert market.bids(task_id=task_id) == []
