"""Two tasks whose initial weights are equal: two initial models with two IDs, each served by
the one aggregator to its own task's trainers only: neither task waits on the other's model."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from web3 import Web3

from chain.client import FlexMarket
from chain.events import DeviceClass, Role, TaskCreated
from chain.launcher import dev_accounts
from dataplane.access import ChainPolicy
from dataplane.client import fetch_model
from dataplane.protocol import AccessDeniedError
from dataplane.server import DataPlaneServer
from tests.blobs import blob_of
from tests.dataplane.conftest import cert_for
from training.catalogue import initial_weights
from training.serialize import Kind, id_hex
from training.spec import TaskSpec
from training.store import ModelStore

SPEC = TaskSpec(model="digits-mlp", dataset="digits-8x8", rounds=1, seed=0)


@pytest.fixture
def twins(w3: Web3) -> Iterator[tuple[FlexMarket, object, list[tuple[int, object]]]]:
    """One aggregator selected for two tasks, each with a trainer of its own."""
    owner, buyer, aggregator, first, second = dev_accounts(5, start=13)
    snapshot = w3.provider.make_request("evm_snapshot", [])["result"]
    try:
        market = FlexMarket.deploy(w3=w3, sender=owner)
        for device, can_aggregate in ((aggregator, True), (first, False), (second, False)):
            market.register_device(
                sender=owner,
                device=device.address,
                device_class=DeviceClass.CPU,
                can_aggregate=can_aggregate,
            )
        tasks = []
        for trainer in (first, second):
            now = w3.eth.get_block("latest")["timestamp"]
            task_id = (
                market.create_task(
                    sender=buyer,
                    spec_hash=SPEC.hash,
                    rounds=1,
                    min_trainers=1,
                    max_trainers=1,
                    bidding_ends=now + 100,
                    round_timeout=600,
                    budget_wei=10**15,
                )
                .first(TaskCreated)
                .task_id
            )
            for device, role in ((aggregator, Role.AGGREGATOR), (trainer, Role.TRAINER)):
                market.place_bid(
                    sender=device,
                    task_id=task_id,
                    price_per_round_wei=1,
                    samples=100,
                    role=role,
                )
            tasks.append((task_id, trainer))
        w3.provider.make_request("evm_increaseTime", [200])
        w3.provider.make_request("evm_mine", [])
        for task_id, _ in tasks:
            market.select_nodes(sender=buyer, task_id=task_id)
        yield market, aggregator, tasks
    finally:
        w3.provider.make_request("evm_revert", [snapshot])


def test_equal_initial_weights_of_two_tasks_are_two_models_each_served_to_its_own(twins, tmp_path):
    market, aggregator, tasks = twins
    store = ModelStore(tmp_path / "aggregator")
    weights = initial_weights(spec=SPEC)  # the same catalogue model and seed for both tasks
    ids = {}
    for task_id, _ in tasks:
        blob = blob_of(
            weights,
            kind=Kind.GLOBAL,
            task_id=task_id,
            chain_id=market.w3.eth.chain_id,
            contract=market.address,
        )
        ids[task_id] = id_hex(store.put(blob))
        market.publish_global_model(
            sender=aggregator, task_id=task_id, round_number=0, model_id=ids[task_id]
        )
    assert len(set(ids.values())) == 2
    policy = ChainPolicy(market=market)
    with DataPlaneServer(
        certificate=cert_for("aggregator"),
        store=store,
        policy=policy,
        node_address=aggregator.address,
    ) as plane:

        def fetch(task_id: int, trainer) -> bytes:
            return fetch_model(
                base_url=plane.url,
                cert_sha256=plane.certificate.sha256,
                model_id=ids[task_id],
                server_address=aggregator.address,
                account=trainer,
                retries=0,
            )

        for task_id, trainer in tasks:
            assert fetch(task_id, trainer) == store.get(ids[task_id])
            assert market.global_model(task_id=task_id, round_number=0) == ids[task_id]
        (first_task, first), (second_task, second) = tasks
        with pytest.raises(AccessDeniedError):
            fetch(second_task, first)
        with pytest.raises(AccessDeniedError):
            fetch(first_task, second)
    assert [store.info(ids[t]).task_id for t, _ in tasks] == [first_task, second_task]
    np.testing.assert_array_equal(
        store.load(ids[first_task]).values[0], store.load(ids[second_task]).values[0]
    )
