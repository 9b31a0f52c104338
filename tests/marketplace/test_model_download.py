"""The final model: downloaded by its buyer, checked against the chain, in the canonical
format and in standard ones (Keras, numpy), and shown on the model card."""

from __future__ import annotations

import html
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from django.urls import reverse
from django.utils.html import escape
from eth_account import Account

from chain.selection import mask_of
from core.units import wei_to_eth
from dataplane.access import ChainPolicy
from dataplane.server import DataPlaneServer
from dataplane.tls import node_certificate
from marketplace import contract
from marketplace.model_check import model_check
from marketplace.models import Device, ModelCheck, Payout, PayoutReason, TaskOrder
from marketplace.sync import chain_sync
from tests.blobs import blob_of
from tests.marketplace.people import buyer_signup, one_round_selected, task_post
from training.catalogue import initial_weights
from training.datasets import load_test
from training.export import reencoded_id
from training.serialize import Kind, decode, id_hex, model_id
from training.spec import TaskSpec
from training.store import ModelStore

pytestmark = pytest.mark.django_db

SPEC = TaskSpec(model="digits-mlp", dataset="digits-8x8", rounds=1)  # what task_post orders


@pytest.fixture
def ada(client):
    user = buyer_signup("ada")
    client.force_login(user)
    return user


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
def trained(ada, platform_market, w3, chain_rewound, tmp_path: Path) -> Iterator[Trained]:
    aggregator, trainer = Account.create(), Account.create()
    store = ModelStore(tmp_path / "aggregator")
    policy = ChainPolicy(market=platform_market, ttl=0)
    certificate = node_certificate(tmp_path / "tls", common_name="gpu-box")
    plane = DataPlaneServer(
        store=store, policy=policy, node_address=aggregator.address, certificate=certificate
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
            window_s=10,
        )
        tid = task.chain_task_id
        rng = np.random.default_rng(3)
        task_of = {"task_id": tid, "chain_id": w3.eth.chain_id, "contract": platform_market.address}
        # Weights of the task's model (digits-mlp), as training might have left them; the
        # final model is the FedAvg of the one update, so it is that update's values.
        initial, trained_values = (
            [w + rng.normal(0, 0.1, w.shape).astype(np.float32) for w in initial_weights(spec=SPEC)]
            for _ in range(2)
        )
        initial = blob_of(initial, kind=Kind.GLOBAL, round_number=0, **task_of)
        final = blob_of(trained_values, kind=Kind.GLOBAL, round_number=1, **task_of)
        update = blob_of(trained_values, round_number=0, trainer=trainer.address, **task_of)
        store.put(update)
        store.put(initial)
        platform_market.publish_global_model(
            sender=aggregator, task_id=tid, round_number=0, model_id=model_id(initial)
        )
        platform_market.submit_update(
            sender=trainer,
            task_id=tid,
            round_number=0,
            model_id=model_id(update),
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
    # Trained, not settled yet: the card says from when.
    settles = response.context["v"]["round_note"]
    assert settles.startswith("all rounds done; settled after ")
    shown = re.search(r'id="settles-note"[^>]*>(.*?)</p>', html).group(1)
    said = f"A{settles[1:]}: then the devices are paid and the rest comes back to you."
    assert shown == escape(said)
    # Nothing paid yet, and the card does not say "0 ETH" as if it were the pay.
    assert "<dt>Paid to devices</dt><dd>\u2013</dd>" in html
    assert [c["paid_wei"] for c in response.context["card"]["contributors"]] == [None, None]


def test_model_card_money_adds_up_to_the_budget(client, trained, platform_market):
    """Settled, the card's pay and refund add up to the budget to the wei: the devices'
    stakes and bond come back to them beside it and are no part of what the task cost."""
    trained.store_final()
    trained.publish_final()
    tid = trained.task.chain_task_id
    platform_market.finalize(sender=contract.registrar(), task_id=tid)
    chain_sync()
    credited = Payout.objects.filter(task__chain_task_id=tid)
    payouts = {(p.account, p.reason): int(p.amount_wei) for p in credited}
    trainer = next(a for a, r in payouts if r == "trainer")
    assert (trainer, "stake") in payouts  # its stake came back beside its pay

    response = client.get(reverse("task-model", args=[tid]))

    card, snapshot = response.context["card"], response.context["s"]
    assert snapshot["state"] == "finalized"
    refund = int(snapshot["refund_wei"])
    assert card["paid_total_wei"] + refund == int(snapshot["budget_wei"]) == 10**16
    assert card["paid_total_wei"] == payouts[(trainer, "trainer")] + sum(
        amount for (_, reason), amount in payouts.items() if reason == "aggregator"
    )
    paid = {c["device"]: c["paid_wei"] for c in card["contributors"]}
    assert paid[trainer] == payouts[(trainer, "trainer")]
    html = response.content.decode()
    assert f"<dt>Paid to devices</dt><dd>{wei_to_eth(card['paid_total_wei'])} ETH</dd>" in html
    # The task page says what each credit was for, in words.
    page = client.get(reverse("task-detail", args=[tid])).content.decode()
    table = page[page.index('id="payouts-body"') : page.index('id="refund-note"')]
    for (_, reason), amount in payouts.items():
        label = PayoutReason(reason).label
        assert f'{wei_to_eth(amount)} ETH<span class="cell-note">{label}</span>' in table
    assert {"Trainer pay", "Aggregator pay", "Refund", "Stake returned"} <= {
        PayoutReason(r).label for _, r in payouts
    }


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
    task = task_post(ada)  # on chain, but chain sync has not mirrored it

    response = client.get(reverse("task-model-download", args=[task.chain_task_id]))

    assert response.status_code == 409
    assert b'data-code="model_not_ready"' in response.content


# ---------------------------------------------------------------- standard formats

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _exports(settings, tmp_path):
    settings.FLEX_MODEL_EXPORT_DIR = tmp_path / "exports"


def _download(client, task: TaskOrder, fmt: str):
    return client.get(reverse("task-model-download", args=[task.chain_task_id]), {"as": fmt})


def _python(code: str, *, cwd: Path, isolated: bool) -> str:
    """``code`` run by a fresh interpreter; isolated: nothing of FLEX importable (-I, and run
    away from the checkout)."""
    flags = ["-I"] if isolated else []
    done = subprocess.run(
        [sys.executable, *flags, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_keras_file_loads_with_plain_keras_and_predicts_as_flex(client, trained, tmp_path):
    trained.store_final()
    trained.publish_final()
    chain_sync()

    response = _download(client, trained.task, "keras")

    assert response.status_code == 200
    assert response["X-Flex-Model-Id"] == trained.final_id
    assert response["Content-Disposition"].endswith(f'{trained.final_id}.keras"')
    assert "keras.saving.load_model" in response["X-Flex-Check"]
    assert trained.final_id in response["X-Flex-Check"]
    away = tmp_path / "elsewhere"
    away.mkdir()
    keras_file = away / "model.keras"
    keras_file.write_bytes(b"".join(response.streaming_content))
    inputs = away / "inputs.npy"
    np.save(inputs, load_test(schema="digits-8x8").x[:64])

    # The model card's own snippet, run as printed, in a process that cannot import FLEX.
    card = client.get(reverse("task-model", args=[trained.task.chain_task_id])).content.decode()
    snippet = html.unescape(re.search(r"<code>(import keras.*?)</code>", card, re.S).group(1))
    lines = snippet.splitlines()
    assert len(lines) == 5
    assert "flex" not in snippet.replace(f"flex-task-{trained.task.chain_task_id}", "")
    keras_name = re.search(r'"(flex-task-[^"]+\.keras)"', snippet).group(1)
    plain = _python(
        "\n".join(
            [
                *lines[:2],
                f"x = np.load({str(inputs)!r})",
                "p = model.predict(x, verbose=0)",
                "import sys; assert 'training' not in sys.modules and 'core' not in sys.modules",
                "print(p.tolist())",
            ]
        ).replace(keras_name, str(keras_file)),
        cwd=away,
        isolated=True,
    )
    (away / "final.flexmodel").write_bytes(trained.final_blob)
    flex = _python(
        "\n".join(
            [
                "import numpy as np",
                "from training.catalogue import build_model",
                "from training.serialize import decode",
                "from training.spec import TaskSpec",
                f"blob = decode(open({str(away / 'final.flexmodel')!r}, 'rb').read())",
                f"model = build_model(spec=TaskSpec.from_dict({SPEC.as_dict()!r}))",
                "model.set_weights(blob.floats())",
                f"print(model.predict(np.load({str(inputs)!r}), verbose=0).tolist())",
            ]
        ),
        cwd=ROOT,
        isolated=False,
    )
    plain_p, flex_p = np.array(json.loads(plain)), np.array(json.loads(flex))
    assert plain_p.shape == (64, 10)
    np.testing.assert_array_equal(plain_p.argmax(axis=1), flex_p.argmax(axis=1))
    np.testing.assert_allclose(plain_p, flex_p, rtol=0, atol=1e-6)


def test_the_npz_holds_the_final_weights_exactly_and_re_encodes_to_the_on_chain_id(client, trained):
    trained.store_final()
    trained.publish_final()

    response = _download(client, trained.task, "npz")

    assert response.status_code == 200
    assert response["Content-Disposition"].endswith(f'{trained.final_id}.npz"')
    assert "numpy.load" in response["X-Flex-Check"]
    with np.load(io.BytesIO(b"".join(response.streaming_content))) as saved:
        weights = [saved[f"w{i}"] for i in range(len(saved.files))]
    final = decode(trained.final_blob)
    for got, want in zip(weights, final.floats(), strict=True):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
    assert reencoded_id(final, weights) == trained.final_id


def test_converted_files_are_kept_by_model_id_and_shown_verified_on_the_card(client, trained):
    trained.store_final()
    trained.publish_final()
    chain_sync()
    card_url = reverse("task-model", args=[trained.task.chain_task_id])
    assert 'id="verified-badge">Checking<' in client.get(card_url).content.decode()
    # The platform worker's check (marketplace.model_check) recomputes it from its update.
    assert model_check(task_id=trained.task.chain_task_id).state == ModelCheck.State.VERIFIED
    assert "Checked on download" in client.get(card_url).content.decode()

    assert _download(client, trained.task, "npz").status_code == 200
    # Converted once: later downloads are served from the files kept under the model's ID,
    # without fetching from the aggregator again (whose certificate no longer matches).
    Device.objects.filter(name="gpu-box").update(dataplane_cert_sha256="ab" * 32)
    again = _download(client, trained.task, "keras")
    assert again.status_code == 200
    assert again["X-Flex-Model-Id"] == trained.final_id
    assert _download(client, trained.task, "flexmodel").status_code == 502  # the blob is fetched

    card = client.get(card_url).content.decode()
    assert 'id="verified-badge">Verified<' in card
    assert "keras.saving.load_model" in card
    assert "numpy.load" in card


def test_an_unknown_format_is_refused_by_name(client, trained):
    trained.store_final()
    trained.publish_final()

    response = _download(client, trained.task, "onnx")

    assert response.status_code == 400
    assert b'data-code="unknown_format"' in response.content
    api = client.get(f"/api/tasks/{trained.task.chain_task_id}/model/", {"as": "pickle"})
    assert api.status_code == 400
    assert api.json()["code"] == "unknown_format"


def test_a_blob_that_is_not_the_model_is_never_converted(trained, tmp_path):
    # The converter checks the blob against the ID it is told, whatever the caller passes.
    blob = tmp_path / "final.flexmodel"
    blob.write_bytes(trained.final_blob)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC.as_dict()))
    done = subprocess.run(
        [sys.executable, "-m", "training.export", str(blob), "--spec", str(spec),
         "--id", "0x" + "11" * 32, "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith("error: ")
    assert not (tmp_path / "out").exists()
