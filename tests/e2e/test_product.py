"""What buyers and device owners meet in a real browser, at desktop (1366x768) and phone
(390x844) sizes: a long title, a round waiting on a silent trainer, cancelling while bidding,
the verified model in standard formats, and a device's own page."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from chain.events import Role
from chain.selection import mask_of
from core.enrolment import owner_message
from dataplane.access import ChainPolicy
from dataplane.server import DataPlaneServer
from dataplane.tls import node_certificate
from marketplace.model_check import model_check
from marketplace.models import ModelCheck
from marketplace.sync import chain_sync
from tests.blobs import blob_of
from tests.e2e.pages import SIZES, fits_the_width, off_the_loop, signed_in, tables_cut
from tests.marketplace.people import buyer_signup, device_enrol, task_post
from training.catalogue import initial_weights
from training.serialize import Kind, decode, id_hex, model_id
from training.spec import TaskSpec
from training.store import ModelStore

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.parametrize("size", ["desktop", "phone"]),
]

PRICE_WEI = 10**14
LONG_TITLE = "Digits" + "x" * 114  # 120 characters and no place to break


def _bids(market, task_id: int, *, aggregator, trainers) -> None:
    market.place_bid(
        sender=aggregator,
        task_id=task_id,
        price_per_round_wei=PRICE_WEI,
        samples=0,
        role=Role.AGGREGATOR,
    )
    for trainer in trainers:
        market.place_bid(
            sender=trainer,
            task_id=task_id,
            price_per_round_wei=PRICE_WEI,
            samples=300,
            role=Role.TRAINER,
        )


def test_a_long_title_wraps_inside_the_page(
    asgi_server, browser, screenshots, platform_settings, platform_market, size
):
    buyer = buyer_signup(f"long-{size}")
    order = off_the_loop(task_post, buyer, title=LONG_TITLE)
    device_enrol(Account.create(), name="a-device-name-without-any-break-" + "z" * 30)
    off_the_loop(chain_sync)
    page = signed_in(browser, asgi_server, username=buyer.username, size=size)

    for path in (f"/tasks/{order.chain_task_id}/", "/tasks/", "/tasks/new/"):
        page.goto(asgi_server + path)
        assert fits_the_width(page), path
    page.goto(asgi_server + f"/tasks/{order.chain_task_id}/")
    assert page.inner_text("#task-title") == LONG_TITLE  # whole, wrapped
    title = page.locator("#task-title").bounding_box()
    assert title["x"] + title["width"] <= page.viewport_size["width"]
    page.screenshot(path=str(screenshots / f"long-title-{size}.png"), full_page=True)

    # A title over the limit is refused with the limit named, not cut without a word.
    page.goto(asgi_server + "/tasks/new/")
    page.fill("#id_title", "t" * 500)
    page.fill("#id_budget", "0.01")
    page.click("#submit-task")
    assert "at most 120 characters" in page.inner_text("body")
    page.context.close()


def test_the_buyer_sees_a_round_waiting_on_a_silent_trainer(
    asgi_server,
    browser,
    screenshots,
    platform_settings,
    platform_market,
    w3,
    chain_rewound,
    devices_played_by_the_test,
    size,
):
    buyer = buyer_signup(f"stall-{size}")
    aggregator, quick, silent = (Account.create() for _ in range(3))
    device_enrol(aggregator, name="gpu-box", may_aggregate=True)
    device_enrol(quick, name="quick-phone")
    device_enrol(silent, name="silent-phone")
    order = off_the_loop(task_post, buyer, window_s=10, round_timeout_s=30)
    tid = order.chain_task_id
    _bids(platform_market, tid, aggregator=aggregator, trainers=(quick, silent))
    w3.provider.make_request("evm_mine", [platform_market.task(task_id=tid).bidding_ends])
    platform_market.select_nodes(sender=aggregator, task_id=tid)
    rng = np.random.default_rng(1)
    platform_market.publish_global_model(
        sender=aggregator,
        task_id=tid,
        round_number=0,
        model_id=model_id(blob_of([rng.standard_normal(4).astype(np.float32)])),
    )
    platform_market.submit_update(
        sender=quick,
        task_id=tid,
        round_number=0,
        model_id=model_id(blob_of([rng.standard_normal(4).astype(np.float32)])),
    )
    off_the_loop(chain_sync)
    page = signed_in(browser, asgi_server, username=buyer.username, size=size)

    page.goto(asgi_server + f"/tasks/{tid}/")
    page.wait_for_selector("#live.on")

    # Half the round's timeout (15 s) later, with no update from it, the page names the
    # trainer: the page follows the time by itself.
    warning = page.locator("#round-wait")
    warning.wait_for(state="visible", timeout=60_000)
    text = warning.inner_text()
    assert "Round 1 is waiting on silent-phone" in text
    assert "quick-phone" not in text
    assert "not paid for this round" in text
    assert fits_the_width(page)
    assert tables_cut(page) == []
    page.screenshot(path=str(screenshots / f"stalled-trainer-{size}.png"), full_page=True)
    # Past the deadline it says the round closes without it.
    w3.provider.make_request("evm_increaseTime", [30])
    w3.provider.make_request("evm_mine", [])
    page.reload()
    page.wait_for_function(
        "document.getElementById('round-wait').textContent.includes('the deadline passed')"
    )
    assert "without an update from silent-phone" in warning.inner_text()
    # Once the aggregator closes the round, the warning goes.
    platform_market.publish_global_model(
        sender=aggregator,
        task_id=tid,
        round_number=1,
        model_id=model_id(blob_of([rng.standard_normal(4).astype(np.float32)])),
        aggregated_mask=mask_of(
            [platform_market.selection(task_id=tid).trainers.index(quick.address)]
        ),
    )
    off_the_loop(chain_sync)
    page.wait_for_function("document.getElementById('task-state').dataset.state === 'trained'")
    assert warning.is_hidden()
    page.context.close()


def test_the_buyer_cancels_a_task_while_it_is_bidding(
    asgi_server, browser, screenshots, platform_settings, platform_market, size
):
    buyer = buyer_signup(f"cancel-{size}")
    order = off_the_loop(task_post, buyer)
    off_the_loop(chain_sync)
    page = signed_in(browser, asgi_server, username=buyer.username, size=size)
    page.goto(asgi_server + f"/tasks/{order.chain_task_id}/")
    page.wait_for_selector("#live.on")

    page.get_by_text("Cancel task…").click()
    assert page.is_visible("#cancel-confirm")
    page.screenshot(path=str(screenshots / f"cancel-{size}.png"), full_page=True)
    page.click("#cancel-confirm")

    page.wait_for_url(re.compile(rf"/tasks/{order.chain_task_id}/$"))
    assert "0.01 ETH is credited back to you" in page.inner_text(".messages")
    page.wait_for_selector("#live.on")
    off_the_loop(chain_sync)
    page.wait_for_function("document.getElementById('task-state').dataset.state === 'cancelled'")
    assert page.inner_text("#task-state") == "CANCELLED"
    assert page.is_hidden("#cancel-task")
    assert platform_market.credit_of(account=buyer.wallet.address) == 10**16
    page.goto(asgi_server + "/wallet/")
    assert page.inner_text("#wallet-credit").startswith("0.01 ")
    assert fits_the_width(page)
    page.context.close()


def test_the_model_card_verifies_and_serves_keras_and_npz(
    asgi_server,
    browser,
    screenshots,
    platform_settings,
    platform_market,
    w3,
    chain_rewound,
    devices_played_by_the_test,
    tmp_path,
    size,
):
    platform_settings.FLEX_MODEL_EXPORT_DIR = tmp_path / "exports"
    buyer = buyer_signup(f"model-{size}")
    aggregator, trainer = Account.create(), Account.create()
    store = ModelStore(tmp_path / "aggregator")
    certificate = node_certificate(tmp_path / "tls", common_name="gpu-box")
    with DataPlaneServer(
        store=store,
        policy=ChainPolicy(market=platform_market, ttl=0),
        node_address=aggregator.address,
        certificate=certificate,
    ) as plane:
        device_enrol(
            aggregator,
            name="gpu-box",
            may_aggregate=True,
            dataplane_url=plane.url,
            cert=certificate.sha256,
        )
        device_enrol(trainer, name="pixel-7")
        order = off_the_loop(task_post, buyer, window_s=10)
        tid = order.chain_task_id
        _bids(platform_market, tid, aggregator=aggregator, trainers=(trainer,))
        w3.provider.make_request("evm_mine", [platform_market.task(task_id=tid).bidding_ends])
        platform_market.select_nodes(sender=aggregator, task_id=tid)
        rng = np.random.default_rng(5)
        header = {"task_id": tid, "chain_id": w3.eth.chain_id, "contract": platform_market.address}
        spec = TaskSpec(model="digits-mlp", dataset="digits-8x8", rounds=1)
        # The final model is the FedAvg of the one update, so it holds that update's values.
        initial, trained = (
            [w + rng.normal(0, 0.1, w.shape).astype(np.float32) for w in initial_weights(spec=spec)]
            for _ in range(2)
        )
        initial = blob_of(initial, kind=Kind.GLOBAL, round_number=0, **header)
        final = blob_of(trained, kind=Kind.GLOBAL, round_number=1, **header)
        update = blob_of(trained, round_number=0, trainer=trainer.address, **header)
        for blob in (initial, final, update):
            store.put(blob)
        platform_market.publish_global_model(
            sender=aggregator, task_id=tid, round_number=0, model_id=model_id(initial)
        )
        platform_market.submit_update(
            sender=trainer,
            task_id=tid,
            round_number=0,
            model_id=model_id(update),
        )
        platform_market.publish_global_model(
            sender=aggregator,
            task_id=tid,
            round_number=1,
            model_id=model_id(final),
            aggregated_mask=mask_of([0]),
        )
        off_the_loop(chain_sync)
        final_id = id_hex(model_id(final))
        page = signed_in(browser, asgi_server, username=buyer.username, size=size)
        page.goto(asgi_server + f"/tasks/{tid}/model/")
        assert page.text_content("#verified-badge") == "Checking"
        # What the platform worker does (marketplace.model_check): recompute it for the buyer.
        assert off_the_loop(model_check, task_id=tid).state == ModelCheck.State.VERIFIED
        page.reload()
        assert page.text_content("#verified-badge") == "Checked on download"
        assert "keras.saving.load_model" in page.inner_text("#snippet")
        assert fits_the_width(page)

        # The first download converts the model (TensorFlow starts in a subprocess): slow.
        with page.expect_download(timeout=600_000) as keras_download:
            page.click("#download-keras")
        keras_file = tmp_path / keras_download.value.suggested_filename
        keras_download.value.save_as(keras_file)
        assert keras_file.name == f"flex-task-{tid}-round-1-{final_id}.keras"
        assert keras_file.read_bytes()[:2] == b"PK"  # a .keras file is a zip archive
        with page.expect_download(timeout=600_000) as npz_download:
            page.click("#download-npz")
        npz_file = tmp_path / npz_download.value.suggested_filename
        npz_download.value.save_as(npz_file)
        with np.load(npz_file) as saved:
            got = [saved[f"w{i}"] for i in range(len(saved.files))]
        for a, b in zip(got, decode(final).floats(), strict=True):
            np.testing.assert_array_equal(a, b)

        page.reload()
        assert page.text_content("#verified-badge") == "Verified"
        checks = page.inner_text("#verified")
        assert "keras.saving.load_model" in checks
        assert "numpy.load" in checks
        assert final_id in checks
        assert fits_the_width(page)
        assert tables_cut(page) == []
        page.screenshot(path=str(screenshots / f"model-card-{size}.png"), full_page=True)
        page.context.close()


def test_a_device_owner_opens_the_device_page_from_its_signed_link(
    asgi_server, browser, screenshots, platform_settings, platform_market, size
):
    device = Account.create()
    device_enrol(device, name=f"owner-box-{size}")
    order = off_the_loop(task_post, buyer_signup(f"buyer-{size}"))
    platform_market.place_bid(
        sender=device,
        task_id=order.chain_task_id,
        price_per_round_wei=3 * PRICE_WEI,
        samples=250,
        role=Role.TRAINER,
    )
    off_the_loop(chain_sync)
    expires = int(time.time()) + 600
    text = owner_message(
        address=device.address,
        chain_id=platform_market.w3.eth.chain_id,
        contract=platform_market.address,
        expires=expires,
    )
    signature = "0x" + bytes(device.sign_message(encode_defunct(text=text)).signature).hex()
    context = browser.new_context(**SIZES[size])
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.set_default_timeout(120_000)  # a busy machine is waited for, never timed

    page.goto(
        f"{asgi_server}/devices/owner/?address={device.address}&expires={expires}"
        f"&signature={signature}"
    )

    page.wait_for_url(re.compile(rf"/devices/{device.address}/$"))
    assert page.inner_text("#device-name") == f"owner-box-{size}"
    assert page.inner_text("#device-bids") == "1"
    tasks = page.inner_text("#device-tasks")
    assert f"#{order.chain_task_id}" in tasks
    if size == "desktop":  # a phone shows the task, role, rounds and pay
        assert "0.0003 ETH" in tasks
    assert tables_cut(page) == []
    assert "no data plane is registered" in page.inner_text("#device-dataplane").lower()
    assert fits_the_width(page)
    page.screenshot(path=str(screenshots / f"device-{size}.png"), full_page=True)
    # The address copies with one click.
    page.locator(".page-head button.copy").click()
    page.wait_for_function(
        "document.querySelector('.page-head button.copy').textContent === 'copied'"
    )
    assert page.evaluate("navigator.clipboard.readText()") == device.address
    # Another device's page stays closed to this browser.
    other = Account.create()
    device_enrol(other, name="someone-else")
    assert page.goto(f"{asgi_server}/devices/{other.address}/").status == 404
    context.close()
