"""The API's validation sets: a buyer uploads one and names it in a spec, a bad upload is
refused naming the fault, and only the task's aggregator may fetch it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from marketplace.models import Task, TaskOrder, ValidationSet
from tests.marketplace.buyers import BUDGET_WEI, SPEC, assert_error, client_for
from tests.marketplace.test_api import _signed
from training import validation
from training.datasets import load_test
from training.spec import TaskSpec
from training.validation import validation_id


def _npz(x, y) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    return buffer.getvalue()


pytestmark = pytest.mark.django_db


def _task_naming(user, content_id: str):
    return client_for(user).post(
        "/api/tasks/create/",
        {
            "spec": {**SPEC, "validation": content_id},
            "budget_wei": str(BUDGET_WEI),
            "min_trainers": 1,
            "max_trainers": 2,
            "bidding_window_s": 3600,
            "round_timeout_s": 600,
        },
        format="json",
    )


def test_the_tasks_aggregator_alone_fetches_its_validation_set(
    alice, bob, finished, platform_market
):
    task, aggregator = finished[Task], finished["aggregator"]
    path = f"/api/tasks/{task.chain_task_id}/validation/"

    response = APIClient().get(path, headers=_signed(aggregator, path, platform_market))

    assert response.status_code == 200
    content_id = finished[TaskOrder].spec["validation"]
    assert response["X-Flex-Validation-Id"] == content_id
    assert validation_id(response.content) == content_id
    assert validation.decode(response.content, schema="digits-8x8", expected_id=content_id)
    trainer = finished["trainer"]
    assert_error(
        APIClient().get(path, headers=_signed(trainer, path, platform_market)),
        403,
        "not_task_aggregator",
    )
    assert APIClient().get(path).status_code in (401, 403)
    # A buyer, even the task's own, is not a device.
    assert client_for(alice).get(path).status_code in (401, 403)


def test_a_buyer_uploads_a_validation_set_and_names_it_in_a_spec(alice, platform_market):
    test = load_test(schema="digits-8x8")
    upload = SimpleUploadedFile("held-out.npz", _npz(test.x[:30], test.y[:30]))

    response = client_for(alice).post(
        "/api/validation-sets/", {"dataset": "digits-8x8", "file": upload}, format="multipart"
    )

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["samples"] == 30
    assert body["dataset"] == "digits-8x8"
    created = _task_naming(alice, body["id"])
    assert created.status_code == 201, created.content
    assert created.json()["spec"]["validation"] == body["id"]
    on_chain = platform_market.task(task_id=created.json()["id"]).spec_hash
    assert on_chain == TaskSpec.from_dict({**SPEC, "validation": body["id"]}).hash_hex


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("v.npz", b"PK not really", "not a readable .npz"),
        ("v.exe", b"MZ", "unsupported file type"),
        ("v.csv", b"label,a,b\n1,0.5,0.5\n", "expects (8, 8, 1)"),
    ],
)
def test_a_bad_validation_upload_is_refused_naming_the_fault(alice, name, content, needle):
    response = client_for(alice).post(
        "/api/validation-sets/",
        {"dataset": "digits-8x8", "file": SimpleUploadedFile(name, content)},
        format="multipart",
    )
    body = assert_error(response, 400, "validation_set_invalid")
    assert needle in body["message"]
    assert name in body["message"]
    assert not ValidationSet.objects.exists()


def test_a_spec_naming_a_validation_set_not_uploaded_is_refused(alice, platform_market):
    before = platform_market.task_count()
    response = _task_naming(alice, "0x" + "ab" * 32)
    body = assert_error(response, 400, "validation_set_unknown")
    assert "0x" + "ab" * 32 in body["message"]
    assert platform_market.task_count() == before
    assert (
        client_for(alice).post("/api/validation-sets/", {}, format="multipart").status_code == 400
    )


def test_a_buyer_cannot_name_another_buyers_validation_set(alice, bob, platform_market):
    """Bob read the ID of Alice's validation set in her task's spec (every device that may bid
    sees it). Named in a task of his, the aggregator he picks would be sent her samples."""
    test = load_test(schema="digits-8x8")
    samples = _npz(test.x[:30], test.y[:30])

    def upload(user) -> str:
        file = SimpleUploadedFile("mine.npz", samples)
        answer = client_for(user).post(
            "/api/validation-sets/", {"dataset": "digits-8x8", "file": file}, format="multipart"
        )
        return answer.json()["id"]

    alices = upload(alice)
    assert _task_naming(alice, alices).status_code == 201
    before = platform_market.task_count()

    stolen = assert_error(_task_naming(bob, alices), 400, "validation_set_unknown")
    made_up = "0x" + "cd" * 32
    unknown = assert_error(_task_naming(bob, made_up), 400, "validation_set_unknown")

    assert "not among your uploads" in stolen["message"]
    # The same answer as for a set nobody uploaded: it does not tell him that hers exists.
    assert stolen["message"].replace(alices, "ID") == unknown["message"].replace(made_up, "ID")
    assert platform_market.task_count() == before  # nothing was sent to the chain
    # Holding the same samples, he uploads them himself (stored once), and may name them.
    assert upload(bob) == alices
    assert ValidationSet.objects.get(content_id=alices).uploaded_by.count() == 2
    assert _task_naming(bob, alices).status_code == 201


def test_a_spec_may_name_the_bundled_split_by_its_id(alice, platform_market):
    bundled = validation_id(validation.bundled(schema="digits-8x8"))
    response = _task_naming(alice, bundled)
    assert response.status_code == 201, response.content
    assert response.json()["spec"]["validation"] == bundled
    assert ValidationSet.objects.get().content_id == bundled
