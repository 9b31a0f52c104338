"""The Django admin: devices and join tokens carried to the chain, the mirror read-only."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.contrib import admin
from django.contrib.messages import get_messages
from django.urls import reverse
from eth_account import Account
from eth_account.messages import encode_defunct

from chain.events import DeviceClass, DeviceStatus, Role
from chain.selection import mask_of
from core.enrolment import join_message
from core.units import eth_text
from marketplace import contract, reports
from marketplace.models import (
    Bid,
    ChainCursor,
    ChainEventRecord,
    Device,
    JoinToken,
    LifecycleAction,
    Payout,
    Round,
    RoundReport,
    SelectedNode,
    Task,
    TaskOrder,
    Update,
    UpdateReport,
    ValidationSet,
    token_digest,
)
from marketplace.services import (
    device_enrol,
    join_challenge_issue,
    join_token_issue,
    task_create,
    user_signup,
    wallet_fund,
)
from marketplace.sync import chain_sync
from marketplace.wallets import wallet_of
from tests.conftest import MIN_PRICE_WEI
from tests.marketplace import people
from training.spec import TaskSpec

pytestmark = pytest.mark.django_db

MIRROR_MODELS = [
    Task,
    Bid,
    SelectedNode,
    Round,
    Update,
    Payout,
    ChainEventRecord,
    ChainCursor,
    LifecycleAction,
]
# Rows the website and the nodes record beside the mirror: shown, never edited by hand either.
REPORTED_MODELS = [TaskOrder, RoundReport, UpdateReport, ValidationSet]


def enrol_with(raw_token: str, *, name: str = "box", device_class: str = "cpu") -> Device:
    """Enrol a fresh device key through the real services, as the join endpoints do."""
    account = Account.create()
    challenge = join_challenge_issue(raw_token=raw_token).challenge
    text = join_message(challenge=challenge, address=account.address)
    signature = account.sign_message(encode_defunct(text=text)).signature
    device = device_enrol(
        raw_token=raw_token,
        address=account.address,
        signature="0x" + bytes(signature).hex(),
        name=name,
        device_class=device_class,
    )
    device.account = account
    return device


def enrol_device(*, name: str = "box", device_class: str = "cpu", may_aggregate=False) -> Device:
    issued = join_token_issue(label=name, ttl=timedelta(hours=1), may_aggregate=may_aggregate)
    return enrol_with(issued.raw, name=name, device_class=device_class)


def _rpc(w3, method: str, *params):
    return w3.provider.make_request(method, list(params))["result"]


@contextlib.contextmanager
def task_run_to_the_end(market, w3, *, buyer=None) -> Iterator[dict]:
    """A task run to the end on chain by real accounts, then mirrored by chain sync, with the
    nodes' reports: one row of every mirror and reported model. The chain is put back
    afterwards (its clock was moved on)."""
    snapshot = _rpc(w3, "evm_snapshot")
    try:
        if buyer is None:
            buyer = user_signup(username="mirror-buyer", password="a-long-test-passphrase")
            wallet_fund(wallet=wallet_of(user=buyer))
        order = task_create(
            buyer=buyer,
            title="mirrored",
            spec=TaskSpec.from_dict({"model": "digits-mlp", "dataset": "digits-8x8", "rounds": 1}),
            min_trainers=1,
            max_trainers=1,
            round_timeout_s=600,
            dispute_window_s=0,
            budget_wei=10**16,
            bidding_window_s=60,
        )
        task_id = order.chain_task_id
        aggregator = enrol_device(name="agg", may_aggregate=True)
        trainer = enrol_device(name="trainer")
        # Seen while bidding is open, the task makes the platform ask devices to bid.
        assert chain_sync().status == "synced"
        for device, role, samples in (
            (aggregator, Role.AGGREGATOR, 0),
            (trainer, Role.TRAINER, 50),
        ):
            market.place_bid(
                sender=device.account,
                task_id=task_id,
                price_per_round_wei=MIN_PRICE_WEI,
                samples=samples,
                role=role,
            )
        _rpc(w3, "evm_mine", market.task(task_id=task_id).bidding_ends)
        market.select_nodes(sender=contract.registrar(), task_id=task_id)
        model = "0x" + "11" * 32
        publish = market.publish_global_model
        publish(sender=aggregator.account, task_id=task_id, round_number=0, model_id=model)
        update = market.submit_update(
            sender=trainer.account, task_id=task_id, round_number=0, model_id="0x" + "22" * 32
        )
        published = publish(
            sender=aggregator.account,
            task_id=task_id,
            round_number=1,
            model_id="0x" + "33" * 32,
            aggregated_mask=mask_of([0]),
            scores=[7],
        )
        market.finalize(sender=contract.registrar(), task_id=task_id)

        assert chain_sync().status == "synced"
        reports.round_metrics_record(
            task_id=task_id,
            round_number=1,
            model_id="0x" + "33" * 32,
            tx_hash=published.tx_hash,
            accuracy=0.5,
        )
        reports.update_metrics_record(
            task_id=task_id,
            round_number=0,
            trainer=trainer.address,
            model_id="0x" + "22" * 32,
            tx_hash=update.tx_hash,
            train_s=1.0,
        )

        task = Task.objects.get(created_tx=order.created_tx)
        assert task.state == "finalized"
        rows = {Task: task, TaskOrder: order, ChainCursor: ChainCursor.objects.get()}
        rows["aggregator"], rows["trainer"] = aggregator, trainer
        for model_class in MIRROR_MODELS + REPORTED_MODELS:
            rows.setdefault(model_class, model_class.objects.first())
            assert rows[model_class] is not None, model_class
        yield rows
    finally:
        _rpc(w3, "evm_revert", snapshot)


@pytest.fixture
def mirror_rows(platform_settings, platform_market, w3):
    with task_run_to_the_end(platform_market, w3) as rows:
        yield rows


def run_action(client, model: str, action: str, pks, **extra: str) -> list[tuple[str, str]]:
    """POST an admin action (a revocation confirmed); the (level, text) of each message."""
    if action == "revoke_devices":
        extra.setdefault("confirmed", "yes")
    response = client.post(
        reverse(f"admin:marketplace_{model}_changelist"),
        {"action": action, "_selected_action": [str(pk) for pk in pks], **extra},
        follow=True,
    )
    assert response.status_code == 200
    return [(m.level_tag, str(m)) for m in get_messages(response.wsgi_request)]


def test_revoke_asks_first_and_nothing_happens_until_confirmed(admin_client, platform_market):
    device = enrol_device(name="phone-8")

    asked = admin_client.post(
        reverse("admin:marketplace_device_changelist"),
        {"action": "revoke_devices", "_selected_action": [str(device.pk)]},
    )

    assert asked.status_code == 200
    html = asked.content.decode()
    assert "Revoke 1 device on chain?" in html
    assert device.address in html
    assert 'name="confirmed" value="yes"' in html
    assert platform_market.device(device=device.address).status == DeviceStatus.ACTIVE


def test_revoke_is_carried_to_the_chain_and_a_second_revoke_shows_the_revert(
    admin_client, platform_market
):
    device = enrol_device(name="phone-7")
    assert platform_market.device(device=device.address).status == DeviceStatus.ACTIVE
    chain_sync()

    [(level, text)] = run_action(admin_client, "device", "revoke_devices", [device.pk])

    assert level == "success"
    assert "phone-7: revoked on chain in block" in text
    assert platform_market.device(device=device.address).status == DeviceStatus.REVOKED
    # The Device's chain status is the mirror's: chain sync writes it from DeviceRevoked.
    device.refresh_from_db()
    assert device.chain_status == "active"
    chain_sync()
    device.refresh_from_db()
    assert device.chain_status == "revoked"

    [(level, text)] = run_action(admin_client, "device", "revoke_devices", [device.pk])

    assert level == "error"
    assert "FlexMarketDeviceRevoked" in text
    assert platform_market.device(device=device.address).status == DeviceStatus.REVOKED
    # The admin keeps working after the revert.
    page = admin_client.get(reverse("admin:marketplace_device_change", args=[device.pk]))
    assert page.status_code == 200
    assert "revoked (cpu)" in page.content.decode()


def test_a_device_added_in_the_admin_is_registered_on_approve(admin_client, platform_market):
    account = Account.create()
    response = admin_client.post(
        reverse("admin:marketplace_device_add"),
        {
            "name": "gpu-rack",
            "address": account.address.lower(),
            "device_class": "gpu",
            "may_aggregate": "on",
            "dataplane_url": "",
        },
        follow=True,
    )
    assert response.redirect_chain, response.content.decode()[:2000]
    device = Device.objects.get(name="gpu-rack")
    assert device.address == account.address  # stored checksummed
    assert platform_market.device(device=account.address).status == DeviceStatus.NONE

    [(level, text)] = run_action(admin_client, "device", "approve_devices", [device.pk])

    assert level == "success", text
    info = platform_market.device(device=account.address)
    assert info.status == DeviceStatus.ACTIVE
    assert info.device_class == DeviceClass.GPU
    assert info.can_aggregate is True
    device.refresh_from_db()
    assert (device.chain_status, device.registration_tx) == ("none", "")
    chain_sync()
    device.refresh_from_db()
    assert device.chain_status == "active"
    assert device.registration_tx in text


def test_approve_of_an_active_device_names_the_revert_and_approve_reactivates_a_revoked_one(
    admin_client, platform_market
):
    active, revoked = enrol_device(name="a"), enrol_device(name="b", device_class="jetson")
    run_action(admin_client, "device", "revoke_devices", [revoked.pk])

    messages = dict(
        (text.split(":")[0], (level, text))
        for level, text in run_action(
            admin_client, "device", "approve_devices", [active.pk, revoked.pk]
        )
    )

    assert messages["a"][0] == "error"
    assert "FlexMarketDeviceAlreadyRegistered" in messages["a"][1]
    assert messages["b"][0] == "success"
    assert platform_market.device(device=revoked.address).status == DeviceStatus.ACTIVE
    chain_sync()
    revoked.refresh_from_db()
    assert revoked.chain_status == "active"
    assert revoked.registration_tx in messages["b"][1]


def test_device_form_refuses_a_bad_address(admin_client):
    response = admin_client.post(
        reverse("admin:marketplace_device_add"),
        {"name": "x", "address": "0x1234", "device_class": "cpu", "dataplane_url": ""},
    )
    assert response.status_code == 200
    assert "Not a 20-byte hex Ethereum address." in response.content.decode()
    assert not Device.objects.exists()


def test_join_token_issued_in_the_admin_is_shown_once_and_enrols(admin_client, platform_market):
    response = admin_client.post(
        reverse("admin:marketplace_jointoken_add"),
        {"label": "jetson-lab", "may_aggregate": "on", "valid_for_hours": "2"},
        follow=True,
    )

    assert response.status_code == 200
    page = response.content.decode()
    raws = set(re.findall(r"flexjoin_[A-Za-z0-9_-]{43}", page))
    assert len(raws) == 1
    raw = raws.pop()
    token = JoinToken.objects.get()
    assert token.digest == token_digest(raw)
    assert token.label == "jetson-lab"
    assert token.may_aggregate is True
    assert token.created_by.username == "admin"
    assert timedelta(hours=2) - (token.expires_at - token.created_at) < timedelta(seconds=1)
    # Never again: neither the list nor the token's own page shows it.
    for url in (
        reverse("admin:marketplace_jointoken_changelist"),
        reverse("admin:marketplace_jointoken_change", args=[token.pk]),
    ):
        again = admin_client.get(url)
        assert again.status_code == 200
        assert raw not in again.content.decode()
        assert "jetson-lab" in again.content.decode()

    device = enrol_with(raw, name="jetson-lab", device_class="jetson")

    info = platform_market.device(device=device.address)
    assert info.status == DeviceStatus.ACTIVE
    assert info.can_aggregate is True
    token.refresh_from_db()
    assert token.status == "used"


def test_join_token_lifetime_must_be_positive_in_the_admin(admin_client):
    response = admin_client.post(
        reverse("admin:marketplace_jointoken_add"),
        {"label": "never", "valid_for_hours": "0"},
    )
    assert response.status_code == 200
    assert "valid_for_hours" in response.content.decode()
    assert not JoinToken.objects.exists()


def test_join_token_list_shows_status_and_revoke_action_revokes(admin_client):
    valid = join_token_issue(label="tok-valid", ttl=timedelta(hours=1)).token
    spent = join_token_issue(label="tok-used", ttl=timedelta(hours=1))
    enrol_with(spent.raw, name="tok-used")
    used = spent.token

    messages = run_action(admin_client, "jointoken", "revoke_tokens", [valid.pk, used.pk])

    assert ("success", "Revoked 1 join token(s).") in messages
    assert any(level == "warning" and "tok-used (used)" in t for level, t in messages)
    valid.refresh_from_db()
    assert valid.status == "revoked"
    listing = admin_client.get(
        reverse("admin:marketplace_jointoken_changelist"), {"status": "revoked"}
    ).content.decode()
    assert "tok-valid" in listing
    assert "tok-used" not in listing


def test_join_tokens_cannot_be_edited_or_deleted(admin_client):
    token = join_token_issue(label="fixed", ttl=timedelta(hours=1)).token
    change = reverse("admin:marketplace_jointoken_change", args=[token.pk])
    assert admin_client.post(change, {"label": "renamed"}).status_code == 403
    delete = reverse("admin:marketplace_jointoken_delete", args=[token.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    token.refresh_from_db()
    assert token.label == "fixed"


@pytest.mark.parametrize("model", MIRROR_MODELS + REPORTED_MODELS, ids=lambda m: m.__name__)
def test_mirror_and_reported_models_are_read_only(admin_client, model, mirror_rows):
    name = model._meta.model_name
    obj = mirror_rows[model]
    count = model.objects.count()

    assert admin_client.get(reverse(f"admin:marketplace_{name}_add")).status_code == 403
    change = reverse(f"admin:marketplace_{name}_change", args=[obj.pk])
    view = admin_client.get(change)
    assert view.status_code == 200  # viewable...
    assert b'type="submit"' not in view.content.split(b'id="content-main"')[1]
    assert admin_client.post(change, {}).status_code == 403  # ...not changeable
    delete = reverse(f"admin:marketplace_{name}_delete", args=[obj.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    changelist = admin_client.get(reverse(f"admin:marketplace_{name}_changelist"))
    assert changelist.status_code == 200
    assert b"delete_selected" not in changelist.content
    assert model.objects.count() == count


def test_a_device_and_a_task_link_from_the_admin_to_their_pages(admin_client, mirror_rows):
    task = mirror_rows[Task]
    device = Device.objects.get(address=task.aggregator)
    pages = {
        "device": (device, reverse("device-page", args=[device.address]), device.name),
        "task": (task, reverse("task-detail", args=[task.chain_task_id]), task.spec_hash),
    }
    for name, (obj, page, shown) in pages.items():
        change = admin_client.get(reverse(f"admin:marketplace_{name}_change", args=[obj.pk]))
        link = re.search(r'href="([^"]+)" class="viewsitelink"', change.content.decode())

        followed = admin_client.get(link.group(1), follow=True)

        assert followed.status_code == 200
        assert followed.redirect_chain[-1][0].endswith(page)
        assert shown in followed.content.decode()


def test_chain_sync_status_page_shows_cursor_head_and_lag(admin_client, mirror_rows, w3):
    cursor = mirror_rows[ChainCursor]

    page = admin_client.get(reverse("admin:marketplace_chaincursor_changelist"))

    assert page.status_code == 200
    html = page.content.decode()
    assert "Chain sync status" in html
    behind = cursor.head_block - cursor.block_number
    assert f'<td class="field-lag_blocks">{behind} block{"s" if behind != 1 else ""}</td>' in html
    if cursor.last_lag_ms is not None:  # whole milliseconds, not a raw float
        assert re.search(r'<td class="field-lag">\d+(\.\d)? m?s</td>', html)
    head = w3.eth.block_number
    assert re.search(rf"{head} \(\d+ behind\)", html)


def test_task_page_shows_wei_exactly_and_in_eth(admin_client, mirror_rows):
    task = mirror_rows[Task]
    page = admin_client.get(reverse("admin:marketplace_task_change", args=[task.pk]))
    html = page.content.decode()
    assert eth_text(task.budget_wei) in html
    assert str(task.budget_wei) in html


def test_tasks_show_rounds_done_and_reported_figures_for_people(admin_client, mirror_rows):
    task = mirror_rows[Task]

    listing = admin_client.get(reverse("admin:marketplace_task_changelist")).content.decode()
    page = admin_client.get(reverse("admin:marketplace_task_change", args=[task.pk]))

    done = f"{max(task.published_rounds - 1, 0)} of {task.rounds}"
    assert f'<td class="field-rounds_done">{done}</td>' in listing
    html = page.content.decode()
    assert "50.0%" in html  # the reported accuracy 0.5
    assert "0.5<" not in html


def test_wallets_show_their_balance_and_credit(admin_client):
    user = user_signup(username="wallet-owner", password="a-long-test-passphrase")

    page = admin_client.get(reverse("admin:marketplace_wallet_changelist")).content.decode()

    assert user.wallet.address in page
    assert '<td class="field-balance">0 ETH (0 wei)</td>' in page
    assert '<td class="field-credit">0 ETH (0 wei)</td>' in page


def test_eth_text_is_exact_for_any_uint256():
    assert eth_text(1) == "0.000000000000000001 ETH (1 wei)"
    assert eth_text(15 * 10**17) == "1.5 ETH (1500000000000000000 wei)"
    assert eth_text(0) == "0 ETH (0 wei)"
    top = 2**256 - 1
    assert eth_text(top).startswith(f"{str(top)[:-18]}.{str(top)[-18:]} ETH")


def test_every_admin_page_renders(admin_client, mirror_rows):
    enrol_device(name="listed")
    for model in admin.site._registry:
        meta = model._meta
        changelist = reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist")
        assert admin_client.get(changelist).status_code == 200, changelist
        obj = model.objects.first()
        if obj is not None:
            change = reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk])
            assert admin_client.get(change).status_code == 200, change
    assert admin_client.get(reverse("admin:index")).status_code == 200


def test_the_task_list_flags_a_round_waiting_on_a_silent_trainer(admin_client, platform_market, w3):
    # A timeout no busy machine's chain sync and page take half of: not late until the chain
    # clock is moved past that half.
    timeout_s = 600
    snapshot = w3.provider.make_request("evm_snapshot", [])["result"]
    try:
        aggregator, quick, silent = (Account.create() for _ in range(3))
        people.device_enrol(aggregator, name="agg", may_aggregate=True)
        people.device_enrol(quick, name="quick")
        people.device_enrol(silent, name="silent")
        order = people.task_post(
            people.buyer_signup("admin-view"), window_s=10, round_timeout_s=timeout_s
        )
        tid = order.chain_task_id
        for device, role in (
            (aggregator, Role.AGGREGATOR),
            (quick, Role.TRAINER),
            (silent, Role.TRAINER),
        ):
            platform_market.place_bid(
                sender=device, task_id=tid, price_per_round_wei=10**14, samples=100, role=role
            )
        w3.provider.make_request("evm_mine", [platform_market.task(task_id=tid).bidding_ends])
        platform_market.select_nodes(sender=aggregator, task_id=tid)
        platform_market.publish_global_model(
            sender=aggregator, task_id=tid, round_number=0, model_id="0x" + "44" * 32
        )
        platform_market.submit_update(
            sender=quick, task_id=tid, round_number=0, model_id="0x" + "55" * 32
        )
        chain_sync()
        listing = reverse("admin:marketplace_task_changelist")
        assert "1: 1 of 2 updates<" in admin_client.get(listing).content.decode()

        w3.provider.make_request("evm_increaseTime", [timeout_s // 2 + 1])
        w3.provider.make_request("evm_mine", [])

        assert "1: 1 of 2 updates · late" in admin_client.get(listing).content.decode()
    finally:
        w3.provider.make_request("evm_revert", [snapshot])
