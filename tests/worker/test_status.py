"""`python -m worker status` against the real platform: what the device bid on, its data
plane from both sides, and a signed link that opens its page on the website."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from chain.events import Role, TaskCreated
from chain.launcher import dev_accounts
from chain.node import chain_time
from marketplace.models import Device
from marketplace.sync import chain_sync
from tests.blobs import blob_of
from tests.worker.conftest import PASSPHRASE, TRAINER_PRICE, enrol, worker_cli
from training.spec import TaskSpec
from worker import node as node_mod
from worker.config import KEYSTORE_FILE
from worker.keys import key_load
from worker.trainer import decide_bid

pytestmark = pytest.mark.django_db(transaction=True)


def _bidding_task(market, *, spec_hash: bytes) -> int:
    """A 2-round task of 0.01 ETH, bidding for an hour; its ID."""
    created = market.create_task(
        sender=dev_accounts(1, start=8)[0],
        spec_hash=spec_hash,
        rounds=2,
        min_trainers=1,
        max_trainers=2,
        bidding_ends=chain_time(market.w3) + 3600,
        round_timeout=600,
        budget_wei=10**16,
    )
    return created.first(TaskCreated).task_id


def test_status_shows_the_devices_bids_and_health_and_links_to_its_page(
    live_server, platform, platform_market, tmp_path, client
):
    market = platform_market
    node = enrol(
        live_server, tmp_path / "phone", "--class", "cpu", "--price-wei", str(TRAINER_PRICE)
    )
    device = key_load(path=node.home / KEYSTORE_FILE, passphrase=PASSPHRASE)
    task_id = _bidding_task(market, spec_hash=b"\x02" * 32)
    market.place_bid(
        sender=device,
        task_id=task_id,
        price_per_round_wei=TRAINER_PRICE,
        samples=321,
        role=Role.TRAINER,
    )
    chain_sync()
    # A model in its store, as a round leaves one.
    stored = node.store.info(node.store.put(blob_of([np.ones((4, 3), dtype=np.float32)])))

    done = worker_cli("status", "--home", str(node.home), "--json")

    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["address"] == device.address
    assert (status["bids"], status["selected"], status["rounds_done"]) == (1, 0, 0)
    [task] = status["tasks"]
    assert (task["task_id"], task["state"], task["samples"]) == (task_id, "bidding", 321)
    assert task["price_per_round_wei"] == str(TRAINER_PRICE)
    assert status["credit_wei"] == "0"
    # Its worker is not running: its data plane answers neither here nor to the platform.
    assert "worker start" in status["local_dataplane_problem"]
    assert "cannot be reached" in status["dataplane_problem"]
    assert (status["models_stored"], status["models_bytes"]) == (1, stored.size)

    text = worker_cli("status", "--home", str(node.home)).stdout
    assert "bids       1, selected for 0" in text
    assert f"#{task_id:<4} bidding" in text
    assert "0.0003 ETH" in text
    assert f"models     1 stored, {stored.size:,} bytes; a settled task's go 30 day(s)" in text

    link = status["owner_link"]
    assert link.startswith(live_server.url + "/devices/owner/?")
    opened = client.get(link.removeprefix(live_server.url))
    assert opened.status_code == 302
    page = client.get(opened.url)
    assert page.status_code == 200
    assert page.context["st"]["tasks"][0]["task_id"] == task_id
    # `worker join` linked the owner to the same page.
    [joined_link] = re.findall(r"https?://\S+/devices/owner/\S+", node.joined)
    assert client.get(joined_link.removeprefix(live_server.url)).status_code == 302


def test_status_says_what_is_wrong_when_the_platform_refuses(live_server, platform, tmp_path):
    node = enrol(
        live_server, tmp_path / "gone", "--class", "cpu", "--price-wei", str(TRAINER_PRICE)
    )
    Device.objects.filter(address=node.config.address).delete()  # no longer enrolled here

    done = worker_cli("status", "--home", str(node.home), check=False)

    assert done.returncode == 1
    assert done.stderr.startswith("error: the platform refused: ")
    assert "not an enrolled, unrevoked device" in done.stderr


def test_a_device_joined_without_a_price_bids_at_each_tasks_minimum(
    live_server, platform, platform_market, tmp_path
):
    market = platform_market
    spec = TaskSpec(model="digits-mlp", dataset="digits-8x8", rounds=2)
    joined = enrol(live_server, tmp_path / "cheap", "--class", "cpu", "--partition", "0/2")
    node = node_mod.load(home=joined.home, passphrase=PASSPHRASE)
    task_id = _bidding_task(market, spec_hash=spec.hash)

    decision = decide_bid(node, task_id=task_id, spec=spec)

    assert joined.config.policy.price_per_round_wei == 0
    assert decision.role == Role.TRAINER
    minimum = market.task(task_id=task_id).min_trainer_price_wei
    assert minimum > 0
    assert decision.price_per_round_wei == minimum
