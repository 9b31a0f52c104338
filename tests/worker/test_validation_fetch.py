"""The aggregator's copy of a validation set: the bundled split needs nobody, an uploaded one
comes from the platform only for the task's aggregator, and a kept copy that no longer hashes
to its ID is fetched again."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest

from marketplace import services
from marketplace.validation import validation_set_upload
from tests.worker.conftest import AGGREGATOR_PRICE, PASSPHRASE, TRAINER_PRICE, enrol
from training import validation
from training.datasets import load_test
from training.spec import TaskSpec
from worker import node as nodes
from worker.validation import VALIDATION_DIR, ValidationUnavailableError, validation_set

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_uploaded_set_is_refused_to_a_node_that_is_not_the_tasks_aggregator(
    live_server, platform, platform_market, tmp_path
):
    enrolled = enrol(
        live_server,
        tmp_path / "aggregator",
        "--class",
        "gpu",
        "--price-wei",
        str(TRAINER_PRICE),
        "--aggregator-price-wei",
        str(AGGREGATOR_PRICE),
        aggregator=True,
    )
    node = nodes.load(home=enrolled.home, passphrase=PASSPHRASE)
    buyer = services.user_signup(username="val-buyer", password="a-long-test-passphrase")
    services.wallet_fund(wallet=buyer.wallet)
    test = load_test(schema="digits-8x8")
    buffer = io.BytesIO()
    np.savez(buffer, x=test.x[:50], y=test.y[:50])
    uploaded = validation_set_upload(
        data=buffer.getvalue(), filename="v.npz", dataset="digits-8x8", buyer=buyer
    )
    spec = TaskSpec.from_dict(
        {
            "model": "digits-mlp",
            "dataset": "digits-8x8",
            "rounds": 1,
            "validation": uploaded.content_id,
        }
    )
    order = services.task_create(
        buyer=buyer,
        title="not selected yet",
        spec=spec,
        min_trainers=1,
        max_trainers=1,
        round_timeout_s=600,
        budget_wei=10**16,
        bidding_window_s=3600,
    )

    # Nobody is selected: the platform refuses, naming why; nothing is kept.
    with pytest.raises(ValidationUnavailableError, match="not_task_aggregator"):
        validation_set(node, spec=spec, task_id=order.chain_task_id)
    assert not (enrolled.home / VALIDATION_DIR).exists()

    # The bundled split is built here, without asking anyone, and kept by its ID.
    bundled_id = validation.validation_id(validation.bundled(schema="digits-8x8"))
    bundled = dataclasses.replace(spec, validation=bundled_id)
    assert len(validation_set(node, spec=bundled, task_id=order.chain_task_id)) == len(test)
    kept = enrolled.home / VALIDATION_DIR / f"{bundled_id}.bin"
    assert validation.validation_id(kept.read_bytes()) == bundled_id
    # A kept copy that was altered is dropped and made again.
    kept.write_bytes(kept.read_bytes()[:-4] + b"\0\0\0\1")
    assert len(validation_set(node, spec=bundled, task_id=order.chain_task_id)) == len(test)
    assert validation.validation_id(kept.read_bytes()) == bundled_id
