"""Enrolment through a join token: valid, expired, reused, revoked, forged, wrong signature."""

from __future__ import annotations

import json
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
import requests
from django.conf import settings
from eth_account import Account
from eth_account.messages import encode_defunct

from chain.events import DeviceClass, DeviceStatus
from core.broker import vhost_of
from core.enrolment import join_message
from dataplane.tls import node_certificate_load
from marketplace.errors import JoinTokenError
from marketplace.models import Device, JoinToken
from marketplace.services import join_token_issue, join_token_revoke
from marketplace.sync import chain_sync
from worker import config as device_config
from worker.config import BidPolicy
from worker.join import JoinError, join

pytestmark = pytest.mark.django_db(transaction=True)

POLICY = BidPolicy(price_per_round_wei=2 * 10**14, min_budget_wei=10**15)


def _join(live_server, tmp_path, raw_token, account=None, **kw):
    return join(
        server_url=live_server.url,
        token=raw_token,
        account=account or Account.create(),
        home=tmp_path / "device",
        name=kw.pop("name", "jetson-1"),
        device_class=kw.pop("device_class", "jetson"),
        policy=POLICY,
        **kw,
    )


def test_valid_token_enrols_and_registers_on_chain(live_server, tmp_path, platform_market):
    issued = join_token_issue(label="jetson-1", ttl=timedelta(hours=1), may_aggregate=True)
    account = Account.create()

    cfg = _join(live_server, tmp_path, issued.raw, account=account)

    assert cfg.address == account.address
    assert cfg.queues == [f"device.{cfg.device_id}"]  # its own queue, nothing shared
    broker = urlsplit(cfg.broker_url)
    assert broker.username == f"{vhost_of(settings.FLEX_BROKER_URL)}.device-{cfg.device_id}"
    assert broker.password
    assert broker.password not in settings.FLEX_BROKER_URL
    assert "redis" not in json.dumps(cfg.model_dump())  # the platform's Redis stays its own
    assert device_config.load(tmp_path / "device") == cfg
    info = platform_market.device(device=account.address)
    assert info.status == DeviceStatus.ACTIVE
    assert info.device_class == DeviceClass.JETSON
    assert info.can_aggregate is True
    chain_sync()  # the Device's chain status and registration are the mirror's
    device = Device.objects.get(address=account.address)
    assert device.chain_status == "active"
    assert device.registration_tx.startswith("0x")
    assert device.dataplane_url == cfg.dataplane_url
    assert cfg.dataplane_url.startswith("https://127.0.0.1:")
    # The device made its TLS certificate; the platform holds its fingerprint for peers.
    assert device.dataplane_cert_sha256 == node_certificate_load(tmp_path / "device" / "tls").sha256
    issued.token.refresh_from_db()
    assert issued.token.status == "used"
    # On the local chain the platform pays the new device's gas.
    assert platform_market.w3.eth.get_balance(account.address) == 10**18


def test_a_device_without_a_name_takes_the_one_its_token_was_issued_for(
    live_server, tmp_path, platform_market
):
    issued = join_token_issue(label="Ada's Jetson", ttl=timedelta(hours=1))
    named = join_token_issue(label="unused label", ttl=timedelta(hours=1))

    cfg = _join(live_server, tmp_path, issued.raw, name=None)
    other = _join(live_server, tmp_path / "other", named.raw, name="gpu-box")

    assert cfg.name == Device.objects.get(address=cfg.address).name == "Ada's Jetson"
    assert other.name == Device.objects.get(address=other.address).name == "gpu-box"


def test_a_name_too_long_is_refused_by_field_and_the_token_stays_usable(
    live_server, tmp_path, platform_market
):
    issued = join_token_issue(label="jetson-lab", ttl=timedelta(hours=1))
    account = Account.create()

    with pytest.raises(JoinError) as exc:
        _join(live_server, tmp_path, issued.raw, account=account, name="x" * 101)

    assert (exc.value.status, exc.value.remote_code) == (400, "invalid")
    assert "name" in exc.value.fields
    assert platform_market.device(device=account.address).status == DeviceStatus.NONE
    issued.token.refresh_from_db()
    assert issued.token.status == "valid"
    assert _join(live_server, tmp_path / "again", issued.raw, name=None).name == "jetson-lab"


def test_reused_token_is_refused(live_server, tmp_path, platform_market):
    issued = join_token_issue(label="phone", ttl=timedelta(hours=1))
    _join(live_server, tmp_path, issued.raw)
    second = Account.create()

    with pytest.raises(JoinError) as exc:
        _join(live_server, tmp_path / "other", issued.raw, account=second)

    assert exc.value.remote_code == "join_token_invalid"
    assert exc.value.reason == "used"
    assert platform_market.device(device=second.address).status == DeviceStatus.NONE


@pytest.mark.parametrize("state", ["expired", "revoked", "forged"])
def test_unusable_token_registers_nothing(live_server, tmp_path, platform_market, state):
    issued = join_token_issue(label="box", ttl=timedelta(hours=1))
    raw = issued.raw
    if state == "expired":
        JoinToken.objects.filter(pk=issued.token.pk).update(
            created_at=issued.token.created_at - timedelta(hours=2),
            expires_at=issued.token.created_at - timedelta(hours=1),
        )
    elif state == "revoked":
        join_token_revoke(token=issued.token)
    else:
        raw = raw[:-4] + "AAAA"
    account = Account.create()

    with pytest.raises(JoinError) as exc:
        _join(live_server, tmp_path, raw, account=account)

    assert exc.value.status == 403
    assert exc.value.remote_code == "join_token_invalid"
    assert exc.value.reason == ("unknown" if state == "forged" else state)
    assert platform_market.device(device=account.address).status == DeviceStatus.NONE
    assert not Device.objects.exists()
    assert not (tmp_path / "device" / device_config.CONFIG_FILE).exists()


def test_signature_by_another_key_is_refused_and_token_stays_usable(
    live_server, tmp_path, platform_market
):
    issued = join_token_issue(label="gpu-box", ttl=timedelta(hours=1))
    base = live_server.url
    challenge = requests.post(f"{base}/api/join/challenge/", json={"token": issued.raw}).json()
    claimed, impostor = Account.create(), Account.create()
    text = join_message(challenge=challenge["challenge"], address=claimed.address)
    forged = impostor.sign_message(encode_defunct(text=text)).signature

    response = requests.post(
        f"{base}/api/join/complete/",
        json={
            "token": issued.raw,
            "address": claimed.address,
            "signature": "0x" + bytes(forged).hex(),
            "name": "gpu-box",
            "device_class": "gpu",
        },
    )

    assert response.status_code == 403
    body = response.json()
    assert body["code"] == "join_signature_invalid"
    assert body["fields"]["signer"] == impostor.address
    assert platform_market.device(device=claimed.address).status == DeviceStatus.NONE
    issued.token.refresh_from_db()
    assert issued.token.status == "valid"
    # The rightful holder can still enrol with the same token.
    cfg = _join(live_server, tmp_path, issued.raw, device_class="gpu")
    assert platform_market.device(device=cfg.address).status == DeviceStatus.ACTIVE


def test_malformed_input_names_the_field(live_server):
    response = requests.post(
        f"{live_server.url}/api/join/complete/",
        json={
            "token": "x",
            "address": "0x1",
            "signature": "0x",
            "name": "n",
            "device_class": "tpu",
        },
    )
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid"
    assert "device_class" in body["fields"]


def test_challenge_must_come_first(live_server):
    issued = join_token_issue(label="late", ttl=timedelta(hours=1))
    account = Account.create()
    response = requests.post(
        f"{live_server.url}/api/join/complete/",
        json={
            "token": issued.raw,
            "address": account.address,
            "signature": "0x" + "00" * 65,
            "name": "late",
            "device_class": "cpu",
        },
    )
    assert response.status_code == 409
    assert response.json()["code"] == "join_challenge_invalid"


def test_token_lifetime_must_be_positive():
    with pytest.raises(JoinTokenError):
        join_token_issue(label="never", ttl=timedelta(0))


# ---------------------------------------------------------------- where the data plane is


def test_a_dataplane_url_with_a_query_is_refused_at_join(live_server, tmp_path, platform_market):
    issued = join_token_issue(label="sly", ttl=timedelta(hours=1))
    account = Account.create()

    with pytest.raises(JoinError) as exc:
        _join(
            live_server,
            tmp_path,
            issued.raw,
            account=account,
            dataplane_url="https://device.example.org:8443/?redirect=https://evil.example",
        )

    assert exc.value.status == 400
    assert exc.value.remote_code == "dataplane_url_invalid"
    assert "may hold no query (?) or fragment (#)" in exc.value.message
    # Nothing was registered; the token can be used again with a proper URL.
    assert platform_market.device(device=account.address).status == DeviceStatus.NONE
    assert not Device.objects.exists()
    issued.token.refresh_from_db()
    assert issued.token.status == "valid"


def test_private_dataplane_addresses_only_when_the_platform_allows_them(
    live_server, tmp_path, platform_market, settings
):
    settings.FLEX_DATAPLANE_ALLOW_PRIVATE = False
    issued = join_token_issue(label="lan", ttl=timedelta(hours=1))

    with pytest.raises(JoinError) as exc:
        _join(live_server, tmp_path, issued.raw, dataplane_host="10.20.30.40")
    assert exc.value.remote_code == "dataplane_url_invalid"
    assert "private" in exc.value.message

    cfg = _join(
        live_server, tmp_path, issued.raw, dataplane_url="https://device-7.example.org:8443"
    )
    device = Device.objects.get(address=cfg.address)
    assert device.dataplane_url == "https://device-7.example.org:8443"


def test_the_platform_refuses_a_url_without_a_certificate_fingerprint(live_server):
    issued = join_token_issue(label="nocert", ttl=timedelta(hours=1))
    account = Account.create()
    base = live_server.url
    challenge = requests.post(f"{base}/api/join/challenge/", json={"token": issued.raw}).json()
    text = join_message(challenge=challenge["challenge"], address=account.address)
    signature = account.sign_message(encode_defunct(text=text)).signature

    response = requests.post(
        f"{base}/api/join/complete/",
        json={
            "token": issued.raw,
            "address": account.address,
            "signature": "0x" + bytes(signature).hex(),
            "name": "nocert",
            "device_class": "cpu",
            "dataplane_url": "https://127.0.0.1:4443",
        },
    )

    assert response.status_code == 400
    assert response.json()["code"] == "cert_fingerprint_invalid"


def test_join_on_every_interface_needs_the_advertised_url(live_server, tmp_path):
    issued = join_token_issue(label="wild", ttl=timedelta(hours=1))
    with pytest.raises(JoinError, match="--dataplane-url"):
        _join(live_server, tmp_path, issued.raw, dataplane_host="0.0.0.0")
