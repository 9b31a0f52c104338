"""The buyer website: pages, who may see what, the task page from the mirror, and the model
download checked against the chain."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from django.urls import reverse
from eth_account import Account
from eth_account.messages import encode_defunct

from chain.events import Role
from chain.selection import mask_of
from core.enrolment import join_message
from dataplane.access import ChainPolicy
from dataplane.server import DataPlaneServer
from dataplane.tls import node_certificate
from marketplace import services
from marketplace.models import Device, TaskOrder
from marketplace.sync import chain_sync
from marketplace.task_page import page_view, round_wait
from tests.blobs import blob_of
from training.serialize import Kind, id_hex, model_id
from training.spec import TaskSpec
from training.store import ModelStore

pytestmark = pytest.mark.django_db

PASSWORD = "a-long-enough-passphrase-42"
PRICE_WEI = 2 * 10**14


def _buyer(username: str):
    user = services.user_signup(username=username, password=PASSWORD)
    services.wallet_fund(wallet=user.wallet)
    return user


def _task(buyer, *, title="Digits", rounds=1, window_s=600) -> TaskOrder:
    return services.task_create(
        buyer=buyer,
        title=title,
        spec=TaskSpec(model="digits-mlp", dataset="digits-8x8", rounds=rounds),
        min_trainers=1,
        max_trainers=2,
        bidding_window_s=window_s,
        round_timeout_s=600,
        budget_wei=10**16,
    )


def _enrol(
    account, *, name: str, may_aggregate: bool = False, dataplane_url: str = "", cert: str = ""
):
    """A device enrolled the way `worker join` does it: token, signed challenge, registration."""
    issued = services.join_token_issue(
        label=name, ttl=timedelta(hours=1), may_aggregate=may_aggregate
    )
    token = services.join_challenge_issue(raw_token=issued.raw)
    text = join_message(challenge=token.challenge, address=account.address)
    signature = account.sign_message(encode_defunct(text=text)).signature
    return services.device_enrol(
        raw_token=issued.raw,
        address=account.address,
        signature="0x" + bytes(signature).hex(),
        name=name,
        device_class="gpu" if may_aggregate else "cpu",
        dataplane_url=dataplane_url,
        dataplane_cert_sha256=cert,
    )


@pytest.fixture
def ada(client):
    user = _buyer("ada")
    client.force_login(user)
    return user


# ---------------------------------------------------------------- pages


def test_home_explains_flex_and_links_to_sign_up(client):
    response = client.get(reverse("home"))

    html = response.content.decode()
    assert response.status_code == 200
    assert "federated learning" in html
    assert reverse("signup") in html
    assert reverse("login") in html


def test_log_in_and_out(client):
    services.user_signup(username="bea", password=PASSWORD)

    response = client.post(reverse("login"), {"username": "bea", "password": PASSWORD})
    assert response.status_code == 302
    assert response.url == reverse("task-list")
    assert client.get(reverse("task-list")).status_code == 200

    response = client.post(reverse("logout"))
    assert response.url == reverse("home")
    assert client.get(reverse("task-list")).status_code == 302


def test_wrong_password_is_refused(client):
    services.user_signup(username="cy", password=PASSWORD)

    response = client.post(reverse("login"), {"username": "cy", "password": "nope"})

    assert response.status_code == 200
    assert response.context["form"].errors
    assert "_auth_user_id" not in client.session


def test_task_list_shows_only_the_buyers_own_tasks(client, ada):
    mine = _task(ada, title="Mine")
    theirs = _task(_buyer("bob"), title="Theirs")

    response = client.get(reverse("task-list"))

    html = response.content.decode()
    assert [t.id for t in response.context["tasks"]] == [mine.chain_task_id]
    assert "Mine" in html
    assert "Theirs" not in html
    assert reverse("task-detail", args=[theirs.chain_task_id]) not in html
    assert 'class="badge state-pending"' in html  # ordered; chain sync has not seen it yet

    chain_sync()
    html = client.get(reverse("task-list")).content.decode()
    assert 'class="badge state-bidding"' in html
    assert "Mine" in html
    assert "Theirs" not in html


def test_markup_in_what_a_buyer_typed_shows_as_text(client, ada):
    task = _task(ada, title="<img src=x onerror=alert(1)>")
    for html in (
        client.get(reverse("task-list")).content.decode(),
        client.get(reverse("task-detail", args=[task.chain_task_id])).content.decode(),
    ):
        assert "<img src=x" not in html
        assert "&lt;img src=x onerror=alert(1)&gt;" in html


@pytest.mark.parametrize("name", ["task-detail", "task-model", "task-model-download"])
def test_another_buyer_cannot_see_a_task(client, ada, name):
    theirs = _task(_buyer("bob"), title="Secret")

    response = client.get(reverse(name, args=[theirs.chain_task_id]))

    assert response.status_code == 404
    assert b"Secret" not in response.content


@pytest.mark.parametrize("name", ["task-list", "task-detail", "task-model", "task-model-download"])
def test_pages_need_a_login(client, name):
    args = [] if name == "task-list" else [1]
    response = client.get(reverse(name, args=args))
    assert response.status_code == 302
    assert response.url.startswith(reverse("login"))


def test_task_page_renders_the_mirror(client, ada, platform_market):
    task = _task(ada, title="Digits MLP")
    trainer = Account.create()
    _enrol(trainer, name="pixel-7")
    platform_market.place_bid(
        sender=trainer,
        task_id=task.chain_task_id,
        price_per_round_wei=PRICE_WEI,
        samples=300,
        role=Role.TRAINER,
    )
    path = reverse("task-detail", args=[task.chain_task_id])
    pending = client.get(path).content.decode()
    assert 'data-state="pending"' in pending  # the order, before chain sync sees the task
    assert "Digits MLP" in pending
    chain_sync()

    response = client.get(path)

    html = response.content.decode()
    assert response.status_code == 200
    assert 'data-state="bidding"' in html
    assert "Digits MLP" in html  # the order's title beside the chain's mirror
    assert task.created_tx in html  # the createTask transaction, in full
    assert "pixel-7" in html  # the bid, by the device's name
    assert "0.0002 ETH" in html  # its price per round
    assert f'data-ws-path="/ws/tasks/{task.chain_task_id}/"' in html
    assert 'id="task-data"' in html  # what the page script starts from
    message = response.context["message"]
    assert [b["device"] for b in message["snapshot"]["bids"]] == [trainer.address]
    assert message["view"]["device_names"] == {trainer.address: "pixel-7"}
    assert json.loads(json.dumps(message)) == message  # what the socket sends is plain JSON
    # The page and the API show one representation of the task.
    api = client.get(f"/api/tasks/{task.chain_task_id}/").json()
    assert api == json.loads(json.dumps(message["snapshot"]))


def test_task_page_view_model():
    snapshot = {
        "state": "running",
        "rounds": 3,
        "published_rounds": 3,
        "current_round": 2,
        "rounds_published": [
            {"number": 0, "accuracy": None, "loss": None},
            {"number": 1, "accuracy": 0.61, "loss": 1.2},
            {"number": 2, "accuracy": 0.8, "loss": 0.7},
        ],
        "transactions": [
            {"name": "TaskCreated", "tx_hash": "0xa", "block_number": 3},
            {"name": "TaskFinalized", "tx_hash": "0xb", "block_number": 9},
            {"name": "PaymentCredited", "tx_hash": "0xb", "block_number": 9},
            {"name": "PaymentCredited", "tx_hash": "0xb", "block_number": 9},
        ],
        "refund_wei": None,
        "bids": [],
        "selected": [],
        "payouts": [],
    }

    page = page_view(snapshot)

    assert [s["status"] for s in page["steps"]] == ["done", "done", "now", "", ""]
    assert (page["done_rounds"], page["round_note"]) == (2, "training round 3 of 3")
    assert (page["latest_accuracy"], page["latest_loss"]) == (0.8, 0.7)
    assert not page["model_ready"]
    assert [(r["tx_hash"], r["label"]) for r in page["tx_rows"]] == [
        ("0xa", "Task created"),
        ("0xb", "Task finalized · 2\u00d7 payment credited"),
    ]
    assert not page["refunded"]
    cancelled = page_view(
        {**snapshot, "state": "cancelled", "current_round": None, "refund_wei": "10"}
    )
    assert cancelled["refunded"]
    assert [s["status"] for s in cancelled["steps"]] == ["done", "bad", "", "", ""]
    assert cancelled["steps"][1]["label"] == "Cancelled"


def test_round_wait_names_the_selected_trainers_without_an_update():
    snapshot = {
        "state": "running",
        "current_round": 1,
        "round_timeout_s": 60,
        "aggregator": "0xA",
        "rounds_published": [
            {"number": 0, "published_at": "2026-01-01T00:00:00Z"},
            {"number": 1, "published_at": "2026-01-01T00:01:00Z"},
        ],
        "selected": [
            {"device": "0xA", "role": "aggregator"},
            {"device": "0xT0", "role": "trainer"},
            {"device": "0xT1", "role": "trainer"},
        ],
        "updates": [
            {"round": 0, "trainer": "0xT1"},  # last round's: does not count
            {"round": 1, "trainer": "0xT0"},
        ],
    }
    start = 1767225660.0  # 2026-01-01T00:01:00Z

    wait = round_wait(snapshot)

    assert wait == {
        "round": 2,
        "started_at": start,
        "expected_by": start + 30,
        "deadline": start + 60,
        "publish_due": start + 120,
        "aggregator": "0xA",
        "missing": ["0xT1"],
    }
    assert round_wait({**snapshot, "state": "trained"}) is None
    done = round_wait(
        {**snapshot, "updates": [*snapshot["updates"], {"round": 1, "trainer": "0xT1"}]}
    )
    assert done["missing"] == []


# ---------------------------------------------------------------- the model


@dataclass
class Trained:
    """A one-round task whose trainer has submitted; the aggregator's last steps are left to
    the test: store the final model, publish its ID on chain."""

    task: TaskOrder
    final_blob: bytes
    final_id: str
    store_final: Callable[[], object]
    publish_final: Callable[[], object]


@pytest.fixture
def trained(ada, platform_market, w3, tmp_path: Path) -> Iterator[Trained]:
    aggregator, trainer = Account.create(), Account.create()
    store = ModelStore(tmp_path / "aggregator")
    policy = ChainPolicy(market=platform_market, ttl=0)
    certificate = node_certificate(tmp_path / "tls", common_name="gpu-box")
    plane = DataPlaneServer(
        store=store, policy=policy, node_address=aggregator.address, certificate=certificate
    )
    with plane:
        _enrol(
            aggregator,
            name="gpu-box",
            may_aggregate=True,
            dataplane_url=plane.url,
            cert=certificate.sha256,
        )
        _enrol(trainer, name="pixel-7")
        task = _task(ada, rounds=1, window_s=10)
        tid = task.chain_task_id
        for device, role, samples in (
            (aggregator, Role.AGGREGATOR, 0),
            (trainer, Role.TRAINER, 500),
        ):
            platform_market.place_bid(
                sender=device,
                task_id=tid,
                price_per_round_wei=PRICE_WEI,
                samples=samples,
                role=role,
            )
        w3.provider.make_request("evm_mine", [platform_market.task(task_id=tid).bidding_ends])
        platform_market.select_nodes(sender=aggregator, task_id=tid)
        rng = np.random.default_rng(3)
        task_of = {"task_id": tid, "chain_id": w3.eth.chain_id, "contract": platform_market.address}
        initial, final = (
            blob_of(
                [rng.standard_normal((64, 10)).astype(np.float32)],
                kind=Kind.GLOBAL,
                round_number=r,
                **task_of,
            )
            for r in (0, 1)
        )
        store.put(initial)
        platform_market.publish_global_model(
            sender=aggregator, task_id=tid, round_number=0, model_id=model_id(initial)
        )
        platform_market.submit_update(
            sender=trainer,
            task_id=tid,
            round_number=0,
            model_id=model_id(
                blob_of([np.ones(3)], round_number=0, trainer=trainer.address, **task_of)
            ),
        )
        chain_sync()
        yield Trained(
            task=task,
            final_blob=final,
            final_id=id_hex(model_id(final)),
            store_final=lambda: store.put(final),
            publish_final=lambda: platform_market.publish_global_model(
                sender=aggregator,
                task_id=tid,
                round_number=1,
                model_id=model_id(final),
                aggregated_mask=mask_of([0]),
            ),
        )


def test_buyer_downloads_the_final_model_checked_against_the_chain(client, trained):
    trained.store_final()
    trained.publish_final()
    task = trained.task

    response = client.get(reverse("task-model-download", args=[task.chain_task_id]))

    assert response.status_code == 200
    assert b"".join(response.streaming_content) == trained.final_blob
    assert response["Content-Length"] == str(len(trained.final_blob))
    assert response["X-Flex-Model-Id"] == trained.final_id
    assert trained.final_id in response["Content-Disposition"]
    assert response["Content-Type"] == "application/octet-stream"


def test_the_download_is_refused_when_the_aggregator_shows_another_certificate(client, trained):
    # Someone else now answers at the aggregator's registered URL (or the registration was
    # tampered with): the web server pins the registered certificate and sends nothing.
    trained.store_final()
    trained.publish_final()
    Device.objects.filter(name="gpu-box").update(dataplane_cert_sha256="ab" * 32)

    response = client.get(reverse("task-model-download", args=[trained.task.chain_task_id]))

    assert response.status_code == 502
    assert "another TLS certificate" in response.content.decode()


def test_model_card_names_contributors_and_the_final_model(client, trained):
    trained.store_final()
    trained.publish_final()
    chain_sync()

    response = client.get(reverse("task-model", args=[trained.task.chain_task_id]))

    html = response.content.decode()
    assert response.status_code == 200
    assert trained.final_id in html
    assert "gpu-box" in html
    assert "pixel-7" in html
    assert reverse("task-model-download", args=[trained.task.chain_task_id]) in html


def test_no_download_before_the_task_is_trained(client, trained):
    trained.store_final()  # in the store, but not yet the task's final model on chain

    response = client.get(reverse("task-model-download", args=[trained.task.chain_task_id]))

    assert response.status_code == 409
    assert b'data-code="model_not_ready"' in response.content


def test_download_serves_only_the_model_the_chain_names(client, trained):
    trained.publish_final()  # the chain names a model the aggregator's store does not hold

    response = client.get(reverse("task-model-download", args=[trained.task.chain_task_id]))

    assert response.status_code == 502
    assert b'data-code="model_not_found"' in response.content


def test_no_download_while_the_task_is_only_ordered(client, ada):
    task = _task(ada)  # on chain, but chain sync has not mirrored it

    response = client.get(reverse("task-model-download", args=[task.chain_task_id]))

    assert response.status_code == 409
    assert b'data-code="model_not_ready"' in response.content
