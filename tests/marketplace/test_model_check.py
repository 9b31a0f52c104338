"""The buyer's check of the final model: before the model card calls it verified, the platform
recomputes it from the last round's updates (chunk by chunk, from the aggregator's data plane,
as the buyer) and the weights on chain, and shows the mismatch when there is one."""

from __future__ import annotations

import html
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from django.urls import reverse
from eth_account import Account

from chain.selection import mask_of
from dataplane.access import ChainPolicy
from dataplane.server import DataPlaneServer
from dataplane.tls import node_certificate
from marketplace.model_check import model_check
from marketplace.models import ModelCheck, TaskOrder
from marketplace.sync import chain_sync
from tests.blobs import blob_of
from tests.marketplace.people import buyer_signup, one_round_selected
from tests.marketplace.test_model_download import SPEC
from training.catalogue import initial_weights
from training.fixedpoint import quantize
from training.serialize import Kind, ModelBlob, decode, model_id
from training.store import ModelStore

pytestmark = pytest.mark.django_db


@dataclass
class Round:
    """A one-round task whose single trainer's update is on the aggregator's store; the test
    publishes a final model with ``publish`` (its values: the update's, or a lie)."""

    task: TaskOrder
    publish: Callable[[bool], ModelBlob]


@pytest.fixture
def ada(client):
    user = buyer_signup("ada")
    client.force_login(user)
    return user


@pytest.fixture
def one_round(ada, platform_market, w3, chain_rewound, tmp_path: Path) -> Iterator[Round]:
    aggregator, trainer = Account.create(), Account.create()
    store = ModelStore(tmp_path / "aggregator")
    certificate = node_certificate(tmp_path / "tls", common_name="gpu-box")
    plane = DataPlaneServer(
        store=store,
        policy=ChainPolicy(market=platform_market, ttl=0),
        node_address=aggregator.address,
        certificate=certificate,
    )
    with plane:
        task = one_round_selected(
            ada,
            platform_market,
            w3,
            aggregator=aggregator,
            trainer=trainer,
            plane_url=plane.url,
            cert=certificate.sha256,
            window_s=600,
        )
        tid = task.chain_task_id
        of_task = {"task_id": tid, "chain_id": w3.eth.chain_id, "contract": platform_market.address}
        initial = quantize(initial_weights(spec=SPEC))
        store.put(initial_blob := blob_of(initial, kind=Kind.GLOBAL, round_number=0, **of_task))
        platform_market.publish_global_model(
            sender=aggregator, task_id=tid, round_number=0, model_id=model_id(initial_blob)
        )
        rng = np.random.default_rng(5)
        trained = [w + rng.integers(-50, 50, w.shape, dtype=np.int32) for w in initial]
        update = blob_of(trained, round_number=0, trainer=trainer.address, **of_task)
        store.put(update)
        platform_market.submit_update(
            sender=trainer, task_id=tid, round_number=0, model_id=model_id(update)
        )

        def publish(honest: bool):
            # FedAvg of one update is the update itself, to the bit.
            values = [w.copy() for w in trained]
            if not honest:
                values[0].reshape(-1)[7] += 1
            final = blob_of(values, kind=Kind.GLOBAL, round_number=1, **of_task)
            store.put(final)
            platform_market.publish_global_model(
                sender=aggregator,
                task_id=tid,
                round_number=1,
                model_id=model_id(final),
                aggregated_mask=mask_of([0]),
            )
            chain_sync()
            return decode(final)

        yield Round(task=task, publish=publish)


def card_of(client, task: TaskOrder) -> str:
    page = client.get(reverse("task-model", args=[task.chain_task_id]))
    assert page.status_code == 200
    return html.unescape(page.content.decode())


def test_an_honest_final_model_is_recomputed_before_it_is_called_verified(client, one_round):
    final = one_round.publish(True)
    card = card_of(client, one_round.task)
    # Shown before the platform worker ran the check: nothing claims it yet.
    assert 'id="verified-badge">Checking<' in card
    assert ModelCheck.objects.get().state == ModelCheck.State.CHECKING

    check = model_check(task_id=one_round.task.chain_task_id)
    assert check.state == ModelCheck.State.VERIFIED
    assert check.chunks_checked == final.header.leaf_count
    card = card_of(client, one_round.task)
    assert "Not verified" not in card
    assert f"all {final.header.leaf_count} chunk(s) equal to the model its ID names" in card


def test_a_wrong_final_model_is_shown_not_verified_with_the_mismatch(client, one_round):
    final = one_round.publish(False)
    check = model_check(task_id=one_round.task.chain_task_id)
    assert check.state == ModelCheck.State.WRONG
    assert check.model_id == "0x" + final.model_id.hex()
    assert (
        "of round 1 differs from the aggregate of its updates at chunk 0, value 7" in check.detail
    )
    card = card_of(client, one_round.task)
    assert 'id="verified-badge">Not verified<' in card
    assert "at chunk 0, value 7" in card
    assert ">Verified<" not in card
