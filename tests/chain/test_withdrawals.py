"""Taking credits out: to the account itself or on to another address, and the refusals."""

from __future__ import annotations

import pytest
from eth_account import Account

from chain.client import FlexMarket
from chain.errors import NothingToWithdrawError
from chain.withdrawals import (
    InsufficientGasError,
    InvalidAddressError,
    balance_of,
    destination,
    withdraw_credit,
)
from tests.chain.conftest import Accounts, Flow

BUDGET = 10**16


@pytest.fixture
def refunded(market: FlexMarket, accounts: Accounts, flow: Flow) -> int:
    """The buyer's credit after it cancels a task: the whole budget."""
    task_id = flow.create_task(budget_wei=BUDGET)
    market.cancel_task(sender=accounts.buyer, task_id=task_id)
    assert market.credit_of(account=accounts.buyer.address) == BUDGET
    return BUDGET


def test_withdraw_to_the_account_itself(market, accounts, w3, refunded):
    before = balance_of(market=market, address=accounts.buyer.address)

    done = withdraw_credit(market=market, sender=accounts.buyer)

    after = balance_of(market=market, address=accounts.buyer.address)
    assert (done.amount_wei, done.to, done.forward_tx) == (BUDGET, accounts.buyer.address, None)
    assert after.credit_wei == 0
    assert after.wallet_wei == before.wallet_wei + BUDGET - done.fee_wei
    assert done.fee_wei > 0


def test_withdraw_to_another_address_sends_exactly_the_credit(market, accounts, w3, refunded):
    outside = Account.create().address
    before = w3.eth.get_balance(accounts.buyer.address)

    done = withdraw_credit(market=market, sender=accounts.buyer, to=outside.lower())

    assert done.to == outside
    assert done.forward_tx is not None
    assert w3.eth.get_balance(outside) == BUDGET
    assert w3.eth.get_balance(accounts.buyer.address) == before - done.fee_wei
    assert market.credit_of(account=accounts.buyer.address) == 0


def test_nothing_to_withdraw_sends_nothing(market, accounts, w3):
    nonce = w3.eth.get_transaction_count(accounts.outsider.address)

    with pytest.raises(NothingToWithdrawError) as exc:
        withdraw_credit(market=market, sender=accounts.outsider)

    assert exc.value.code == "nothing_to_withdraw"
    assert w3.eth.get_transaction_count(accounts.outsider.address) == nonce


def test_someone_elses_credit_stays_theirs(market, accounts, refunded):
    # The contract pays its caller only: an outsider naming itself as the recipient of the
    # buyer's refund still withdraws its own (empty) credit.
    with pytest.raises(NothingToWithdrawError):
        withdraw_credit(market=market, sender=accounts.outsider, to=accounts.outsider.address)
    assert market.credit_of(account=accounts.buyer.address) == BUDGET


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("0x1234", "not a 20-byte"),
        ("not an address", "not a 20-byte"),
        ("0x" + "Ab" * 20, "wrong checksum"),
    ],
)
def test_bad_destinations_are_refused_before_anything_is_sent(
    market, accounts, w3, refunded, value, why
):
    nonce = w3.eth.get_transaction_count(accounts.buyer.address)

    with pytest.raises(InvalidAddressError) as exc:
        withdraw_credit(market=market, sender=accounts.buyer, to=value)

    assert why in exc.value.message
    assert exc.value.code == "invalid_address"
    assert w3.eth.get_transaction_count(accounts.buyer.address) == nonce
    assert market.credit_of(account=accounts.buyer.address) == BUDGET


def test_the_contract_itself_is_not_a_destination(market):
    with pytest.raises(InvalidAddressError):
        destination(market.address, market=market)


def test_an_account_without_gas_money_is_told_before_anything_is_sent(
    market, accounts, w3, refunded
):
    # The buyer's only asset is now its credit: it cannot pay for the withdrawal's gas.
    w3.provider.make_request("anvil_setBalance", [accounts.buyer.address, "0x0"])
    nonce = w3.eth.get_transaction_count(accounts.buyer.address)

    with pytest.raises(InsufficientGasError) as exc:
        withdraw_credit(market=market, sender=accounts.buyer)

    assert exc.value.balance_wei == 0
    assert exc.value.needed_wei > 0
    assert w3.eth.get_transaction_count(accounts.buyer.address) == nonce
    assert market.credit_of(account=accounts.buyer.address) == BUDGET
