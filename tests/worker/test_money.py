"""A device owner's money out: `python -m worker balance` and `python -m worker withdraw`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eth_account import Account

from chain.events import TaskCreated
from chain.node import chain_time
from worker import config as config_mod
from worker.config import KEYSTORE_FILE, BidPolicy, DeviceConfig
from worker.keys import LIGHT_SCRYPT_N, key_create

ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = "device-owner-passphrase"
CREDIT = 3 * 10**15


@pytest.fixture
def device_home(tmp_path, chain_node, platform_market, w3, chain_rewound) -> Path:
    """An enrolled device's home whose key holds gas money and a credit of CREDIT wei (the
    refund of a task it posted and cancelled itself: a credit like any other)."""
    home = tmp_path / "device"
    account = key_create(path=home / KEYSTORE_FILE, passphrase=PASSPHRASE, scrypt_n=LIGHT_SCRYPT_N)
    config_mod.save(
        home,
        DeviceConfig(
            server_url="http://127.0.0.1:9",
            name="owner-box",
            device_id=1,
            address=account.address,
            device_class="cpu",
            queues=["device.1"],
            broker_url="redis://127.0.0.1:9/0",
            eth_rpc_url=chain_node.rpc_url,
            chain_id=w3.eth.chain_id,
            contract_address=platform_market.address,
            policy=BidPolicy(price_per_round_wei=10**14),
        ),
    )
    w3.provider.make_request("anvil_setBalance", [account.address, hex(10**18)])
    created = platform_market.create_task(
        sender=account,
        spec_hash=b"\x01" * 32,
        rounds=1,
        min_trainers=1,
        max_trainers=1,
        bidding_ends=chain_time(w3) + 600,
        round_timeout=600,
        budget_wei=CREDIT,
    )
    task_id = created.first(TaskCreated).task_id
    platform_market.cancel_task(sender=account, task_id=task_id)
    assert platform_market.credit_of(account=account.address) == CREDIT
    return home


def worker_cli(*args: str, passphrase: str = PASSPHRASE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=ROOT,
        env={**os.environ, "FLEX_DEVICE_PASSPHRASE": passphrase},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _address(home: Path) -> str:
    return config_mod.load(home).address


def test_balance_shows_the_account_and_its_credit(device_home, w3):
    done = worker_cli("balance", "--home", str(device_home), "--json")

    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["address"] == _address(device_home)
    assert int(shown["credit_wei"]) == CREDIT
    assert int(shown["wallet_wei"]) == w3.eth.get_balance(_address(device_home))

    text = worker_cli("balance", "--home", str(device_home)).stdout
    assert f"credit   {CREDIT} wei (0.003 ETH)" in text


def test_withdraw_takes_the_credit_into_the_device_account(device_home, w3, platform_market):
    address = _address(device_home)
    before = w3.eth.get_balance(address)

    done = worker_cli("withdraw", "--home", str(device_home), "--json")

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert int(result["amount_wei"]) == CREDIT
    assert result["forward_tx"] is None
    assert platform_market.credit_of(account=address) == 0
    assert w3.eth.get_balance(address) == before + CREDIT - int(result["fee_wei"])

    again = worker_cli("withdraw", "--home", str(device_home))
    assert again.returncode == 1
    assert "Nothing is owed" in again.stderr


def test_withdraw_to_sends_exactly_the_credit_to_another_address(device_home, w3):
    cold = Account.create().address

    done = worker_cli("withdraw", "--home", str(device_home), "--to", cold)

    assert done.returncode == 0, done.stderr
    assert f"sent {CREDIT} wei on to {cold}" in done.stdout
    assert w3.eth.get_balance(cold) == CREDIT


def test_withdraw_refuses_a_bad_address_and_keeps_the_credit(device_home, platform_market):
    done = worker_cli("withdraw", "--home", str(device_home), "--to", "0xdeadbeef")

    assert done.returncode == 1
    assert "not a 20-byte hex Ethereum address" in done.stderr
    assert platform_market.credit_of(account=_address(device_home)) == CREDIT


def test_withdraw_needs_the_device_key(device_home, platform_market):
    done = worker_cli("withdraw", "--home", str(device_home), passphrase="not the passphrase")

    assert done.returncode == 1
    assert "error:" in done.stderr
    assert platform_market.credit_of(account=_address(device_home)) == CREDIT


def test_the_worker_logs_each_payment_credited_to_it(device_home, platform_market, w3, caplog):
    from worker import node as nodes
    from worker.payments import PaymentWatcher

    node = nodes.load(home=device_home, passphrase=PASSPHRASE)
    watcher = PaymentWatcher([node])
    assert watcher.poll() == []  # starts at the head: earlier credits are not news
    created = platform_market.create_task(
        sender=node.account,
        spec_hash=b"\x03" * 32,
        rounds=1,
        min_trainers=1,
        max_trainers=1,
        bidding_ends=chain_time(w3) + 600,
        round_timeout=600,
        budget_wei=CREDIT,
    )
    task_id = created.first(TaskCreated).task_id
    platform_market.cancel_task(sender=node.account, task_id=task_id)

    with caplog.at_level("INFO", logger="worker.payments"):
        [paid] = watcher.poll()

    assert (paid.account, paid.task_id, paid.amount_wei) == (node.address, task_id, CREDIT)
    assert watcher.poll() == []  # each payment once
    [line] = [r.getMessage() for r in caplog.records if r.name == "worker.payments"]
    assert f"owner-box was paid 0.003 ETH ({CREDIT} wei, refund) for task {task_id}" in line
    assert "python -m worker withdraw" in line


def test_a_payment_mined_just_before_the_worker_stops_is_logged(
    device_home, platform_market, w3, caplog
):
    from worker import node as nodes
    from worker.payments import PaymentWatcher

    node = nodes.load(home=device_home, passphrase=PASSPHRASE)
    watcher = PaymentWatcher([node], interval=3600).start()  # its thread will not poll again
    created = platform_market.create_task(
        sender=node.account,
        spec_hash=b"\x04" * 32,
        rounds=1,
        min_trainers=1,
        max_trainers=1,
        bidding_ends=chain_time(w3) + 600,
        round_timeout=600,
        budget_wei=CREDIT,
    )
    platform_market.cancel_task(sender=node.account, task_id=created.first(TaskCreated).task_id)

    with caplog.at_level("INFO", logger="worker.payments"):
        watcher.stop()

    assert any("was paid 0.003 ETH" in r.getMessage() for r in caplog.records)
