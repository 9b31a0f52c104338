"""The client's plumbing: nonces under concurrency, a lost node, results."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from eth_account import Account
from web3 import Web3

from chain.client import FlexMarket
from chain.errors import ChainUnavailableError, TransactionRejectedError, UnknownTaskError
from chain.events import DeviceClass, DeviceRegistered, DeviceStatus, TaskCreated
from chain.launcher import free_port
from chain.records import TxResult
from tests.chain.conftest import Accounts, Flow


def test_one_account_sends_many_transactions_at_once(market: FlexMarket, accounts: Accounts):
    devices = [Account.create().address for _ in range(12)]

    def register(device: str) -> TxResult:
        return market.register_device(
            sender=accounts.owner, device=device, device_class=DeviceClass.CPU, can_aggregate=False
        )

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(register, devices))
    assert [r.first(DeviceRegistered).device for r in results] == devices
    assert len({r.tx_hash for r in results}) == len(devices)
    assert all(market.device(device=d).status == DeviceStatus.ACTIVE for d in devices)


def test_transactions_in_a_row_from_one_account(market: FlexMarket, flow: Flow):
    ids = [flow.create_task() for _ in range(4)]
    assert ids == [1, 2, 3, 4]


def test_lost_node_is_chain_unavailable(market: FlexMarket, accounts: Accounts):
    dead = Web3(Web3.HTTPProvider(f"http://127.0.0.1:{free_port()}", request_kwargs={"timeout": 2}))
    offline = FlexMarket(w3=dead, address=market.address)
    with pytest.raises(ChainUnavailableError) as exc:
        offline.task_count()
    assert exc.value.code == "chain_unavailable"
    with pytest.raises(ChainUnavailableError):
        offline.withdraw(sender=accounts.buyer)


def test_view_reverts_are_typed(market: FlexMarket):
    with pytest.raises(UnknownTaskError) as exc:
        market.bids(task_id=5)
    assert exc.value.task_id == 5


def test_tx_result_events(market: FlexMarket, flow: Flow):
    task_id = flow.create_task()
    result = market.cancel_task(sender=flow.accounts.buyer, task_id=task_id)
    assert result.gas_used > 0
    assert result.fee_wei == result.gas_used * result.effective_gas_price_wei
    with pytest.raises(LookupError):
        result.first(TaskCreated)
    assert result.all(TaskCreated) == []


def test_sender_without_funds_is_rejected_typed(
    market: FlexMarket, accounts: Accounts, flow: Flow, w3: Web3
):
    broke = Account.create()
    market.register_device(
        sender=accounts.owner,
        device=broke.address,
        device_class=DeviceClass.CPU,
        can_aggregate=False,
    )
    task_id = flow.create_task()
    with pytest.raises(TransactionRejectedError) as exc:
        flow.bid_trainer(task_id, broke, 10**9)
    assert exc.value.code == "transaction_rejected"
    assert exc.value.sender == broke.address
    assert w3.eth.get_transaction_count(broke.address) == 0
