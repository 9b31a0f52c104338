"""Many devices enrolled at once: join tokens issued in bulk, and the real join flow (HTTP to the
web server, registration on chain) run in one process for many homes side by side."""

from __future__ import annotations

import io
import logging
import threading
import time
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from eth_account import Account

from chain.events import DeviceClass, DeviceStatus
from marketplace import contract
from marketplace.models import Device, JoinToken, token_digest
from marketplace.services import join_token_issue, join_token_revoke
from marketplace.sync import chain_sync
from stack.enrolment import PORTS, LocalDevice, PortPicker, enrol_all
from worker import config as device_config
from worker.config import KEYSTORE_FILE, BidPolicy, Partition
from worker.join import JoinError, join
from worker.keys import key_load

pytestmark = pytest.mark.django_db(transaction=True)

PASSPHRASE = "many devices, one test"
ENV = {"FLEX_DEVICE_PASSPHRASE": PASSPHRASE}


def fleet(trainers: int) -> tuple[LocalDevice, ...]:
    aggregator = LocalDevice("agg", "gpu", 3 * 10**14, aggregator_price_wei=4 * 10**14)
    return (
        aggregator,
        *(
            LocalDevice(
                f"sim-{i:02d}",
                ("cpu", "gpu", "jetson")[i % 3],
                10**14 + i * 10**12,
                partition=i,
                partitions=trainers,
            )
            for i in range(trainers)
        ),
    )


def tokens_for(devices) -> dict[str, str]:
    return {
        d.name: join_token_issue(
            label=d.name, ttl=timedelta(minutes=10), may_aggregate=d.aggregator
        ).raw
        for d in devices
    }


def test_devices_enrolled_side_by_side_each_get_their_own_identity(
    live_server, tmp_path, platform_market
):
    devices = {d: tmp_path / d.name for d in fleet(11)}
    tokens = tokens_for(devices)

    done = enrol_all(devices, web_url=live_server.url, env=ENV, threads=4, tokens=tokens)

    assert done.devices == 12
    assert done.per_device_s == pytest.approx(done.seconds / 12)
    configs = {d: device_config.load(home) for d, home in devices.items()}
    # Every identity is its own: key, device id, queue, data-plane port and certificate.
    for field in ("address", "device_id", "dataplane_port", "dataplane_url"):
        assert len({getattr(c, field) for c in configs.values()}) == 12, field
    assert len({tuple(c.queues) for c in configs.values()}) == 12
    for device, cfg in configs.items():
        home = devices[device]
        assert key_load(path=home / KEYSTORE_FILE, passphrase=PASSPHRASE).address == cfg.address
        assert cfg.name == device.name
        assert cfg.policy.price_per_round_wei == device.price_wei
        assert cfg.policy.aggregator_price_per_round_wei == device.aggregator_price_wei
        assert cfg.may_aggregate is device.aggregator
        if device.aggregator:
            assert cfg.partition is None
        else:
            assert cfg.partition == Partition(index=device.partition, count=11)
        info = platform_market.device(device=cfg.address)
        assert info.status == DeviceStatus.ACTIVE
        assert info.device_class == DeviceClass[device.device_class.upper()]
        assert info.can_aggregate is device.aggregator
    chain_sync()
    rows = Device.objects.filter(address__in=[c.address for c in configs.values()])
    assert rows.count() == 12
    assert {r.chain_status for r in rows} == {"active"}
    # One registration transaction each, none shared.
    assert len({r.registration_tx for r in rows}) == 12
    used = JoinToken.objects.filter(digest__in=[token_digest(t) for t in tokens.values()])
    assert {t.status for t in used} == {"used"}


def test_a_refused_token_fails_the_enrolment_with_the_platform_reason(
    live_server, tmp_path, platform_market
):
    devices = {d: tmp_path / d.name for d in fleet(3)}
    tokens = tokens_for(devices)
    refused = next(d for d in devices if d.name == "sim-01")
    join_token_revoke(token=JoinToken.objects.get(digest=token_digest(tokens[refused.name])))

    with pytest.raises(JoinError) as exc:
        enrol_all(devices, web_url=live_server.url, env=ENV, threads=2, tokens=tokens)

    assert "revoked" in exc.value.message
    assert (exc.value.status, exc.value.remote_code) == (403, "join_token_invalid")
    assert not (devices[refused] / "device.json").exists()
    address = key_load(path=devices[refused] / KEYSTORE_FILE, passphrase=PASSPHRASE).address
    assert platform_market.device(device=address).status == DeviceStatus.NONE
    assert not Device.objects.filter(name=refused.name).exists()


def test_a_busy_platform_is_asked_again_until_it_registers_the_device(
    live_server, tmp_path, platform_market, caplog, monkeypatch
):
    caplog.set_level(logging.INFO, logger="worker.join")
    # The platform answers busy once it has waited this long for the registrar.
    monkeypatch.setattr(contract, "PLATFORM_LOCK_WAIT_S", 1)
    issued = join_token_issue(label="late", ttl=timedelta(minutes=10))
    account, joined = Account.create(), {}

    def enrol():
        joined["config"] = join(
            server_url=live_server.url,
            token=issued.raw,
            account=account,
            home=tmp_path / "late",
            name="late",
            device_class="cpu",
            policy=BidPolicy(price_per_round_wei=2 * 10**14),
        )

    # Another platform transaction holds the registrar until the platform has answered busy.
    with contract.platform_account_lock():
        device = threading.Thread(target=enrol)
        device.start()
        deadline = time.monotonic() + 300
        while "busy registering other devices" not in caplog.text:
            assert device.is_alive(), "the join ended before the platform was busy"
            assert time.monotonic() < deadline, "the platform never answered busy"
            time.sleep(0.5)
    device.join(timeout=300)

    assert joined["config"].address == account.address
    assert platform_market.device(device=account.address).status == DeviceStatus.ACTIVE


def test_port_picker_never_hands_out_a_port_twice_nor_one_a_device_holds():
    free = [PORTS.start + 7, PORTS.start + 8, PORTS.start + 9]
    picker = PortPicker(taken=set(PORTS) - set(free))

    picked = {picker.pick() for _ in free}

    assert picked == set(free)
    with pytest.raises(SystemExit, match="no free port"):
        picker.pick()


def test_one_command_issues_a_token_per_label():
    out, err = io.StringIO(), io.StringIO()

    call_command(
        "issue_join_token", "gpu-1", "gpu-2", "gpu-3", "--aggregator", stdout=out, stderr=err
    )

    raw = out.getvalue().split()
    assert len(raw) == 3
    for label, token in zip(("gpu-1", "gpu-2", "gpu-3"), raw, strict=True):
        row = JoinToken.objects.get(digest=token_digest(token))
        assert (row.label, row.may_aggregate, row.status) == (label, True, "valid")
    assert "3 join token(s)" in err.getvalue()


def test_the_command_refuses_a_label_given_twice_and_issues_nothing():
    with pytest.raises(CommandError, match="more than once: \\['phone'\\]"):
        call_command("issue_join_token", "phone", "tablet", "phone", stdout=io.StringIO())
    assert not JoinToken.objects.exists()


def test_the_command_refuses_a_lifetime_that_is_not_positive_and_issues_nothing():
    with pytest.raises(CommandError, match="lifetime must be positive"):
        call_command("issue_join_token", "a", "b", "--hours", "0", stdout=io.StringIO())
    assert not JoinToken.objects.exists()


def test_the_registrar_is_free_while_a_registration_waits_for_its_block(
    live_server, tmp_path, platform_market
):
    issued = join_token_issue(label="slow-block", ttl=timedelta(minutes=10))
    account, joined = Account.create(), {}
    w3 = platform_market.w3
    # A chain that mines only when told, as a real one mines every few seconds.
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        device = threading.Thread(
            target=lambda: joined.update(
                config=join(
                    server_url=live_server.url,
                    token=issued.raw,
                    account=account,
                    home=tmp_path / "slow-block",
                    name="slow-block",
                    device_class="cpu",
                    policy=BidPolicy(price_per_round_wei=2 * 10**14),
                )
            )
        )
        device.start()
        deadline = time.monotonic() + 300
        while not w3.eth.get_block("pending")["transactions"]:
            assert device.is_alive(), "the join ended before its registration was sent"
            assert time.monotonic() < deadline, "the registration was never sent"
            time.sleep(0.2)
        # Sent and not mined: another platform transaction may take the registrar now.
        with contract.platform_account_lock(wait_s=60) as registrar:
            assert registrar.address == platform_market.registrar()
        assert platform_market.device(device=account.address).status == DeviceStatus.NONE
    finally:
        w3.provider.make_request("evm_setAutomine", [True])
        w3.provider.make_request("evm_mine", [])
    device.join(timeout=300)

    assert joined["config"].address == account.address
    assert platform_market.device(device=account.address).status == DeviceStatus.ACTIVE
    assert Device.objects.get(address=account.address).registration_tx
