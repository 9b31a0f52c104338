"""A buyer takes refunds out of the contract: the wallet page and the API, and the refusals."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse
from eth_account import Account

from chain.events import TaskCreated
from chain.node import chain_time
from marketplace import contract, services, wallets

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("chain_rewound")]

PASSWORD = "a-long-enough-passphrase-42"
REFUND = 4 * 10**15


def buyer_with_refund(name: str):
    """A funded buyer whose cancelled task left REFUND wei of credit in the contract."""
    user = services.user_signup(username=name, password=PASSWORD)
    services.wallet_fund(wallet=user.wallet)
    market = contract.market()
    account = wallets.wallet_account(wallet=user.wallet)
    created = market.create_task(
        sender=account,
        spec_hash=b"\x02" * 32,
        rounds=1,
        min_trainers=1,
        max_trainers=1,
        bidding_ends=chain_time(market.w3) + 600,
        round_timeout=600,
        budget_wei=REFUND,
    )
    market.cancel_task(sender=account, task_id=created.first(TaskCreated).task_id)
    assert market.credit_of(account=user.wallet.address) == REFUND
    return user


def credit(user) -> int:
    return contract.market().credit_of(account=user.wallet.address)


def balance(address: str) -> int:
    return contract.w3().eth.get_balance(address)


# ---------------------------------------------------------------- the wallet page


def test_wallet_page_shows_the_credit_beside_the_balance(client):
    user = buyer_with_refund("pat")
    client.force_login(user)

    page = client.get(reverse("wallet")).content.decode()

    assert 'id="wallet-credit"><span title="0.004 ETH exactly">0.004</span> <small>ETH' in page
    # The balance (gas spent to the wei) at a glance, exact beside it.
    balance = re.search(r'id="wallet-balance"><span title="([0-9.]+) ETH exactly">([0-9.]+)<', page)
    exact, shown = balance.groups()
    assert exact.startswith(shown)
    assert len(shown.partition(".")[2]) <= 6
    assert 'id="withdraw-to-wallet"' in page
    assert 'id="withdraw-to-address"' in page


def test_withdraw_to_my_wallet(client):
    user = buyer_with_refund("quin")
    client.force_login(user)
    before = balance(user.wallet.address)

    response = client.post(reverse("wallet-withdraw"), follow=True)

    assert credit(user) == 0
    gained = balance(user.wallet.address) - before
    assert 0 < gained < REFUND  # the credit less the gas
    assert "0.004 ETH withdrawn into your wallet" in response.content.decode()
    assert 'id="withdraw-nothing"' in response.content.decode()


def test_sending_to_an_external_address_asks_for_confirmation_first(client):
    user = buyer_with_refund("ravi")
    client.force_login(user)
    outside = Account.create().address

    asked = client.post(reverse("wallet-withdraw"), {"to": outside.lower()})

    assert asked.status_code == 200
    assert 'id="withdraw-confirm"' in asked.content.decode()
    assert outside in asked.content.decode()
    assert credit(user) == REFUND  # nothing sent yet
    assert balance(outside) == 0

    done = client.post(reverse("wallet-withdraw"), {"to": outside, "confirmed": "on"}, follow=True)

    assert f"sent to {outside}" in done.content.decode()
    assert balance(outside) == REFUND
    assert credit(user) == 0


def test_a_bad_address_is_named_beside_the_field_and_nothing_moves(client):
    user = buyer_with_refund("sam")
    client.force_login(user)
    wrong_checksum = "0x" + "aB" * 20

    response = client.post(reverse("wallet-withdraw"), {"to": wrong_checksum, "confirmed": "on"})

    assert response.status_code == 400
    assert 'id="errors-to"' in response.content.decode()
    assert "wrong checksum" in response.content.decode()
    assert credit(user) == REFUND


def test_nothing_to_withdraw_is_said_and_sends_nothing(client):
    user = services.user_signup(username="tess", password=PASSWORD)
    services.wallet_fund(wallet=user.wallet)
    client.force_login(user)
    nonce = contract.w3().eth.get_transaction_count(user.wallet.address)

    response = client.post(reverse("wallet-withdraw"), follow=True)

    assert "Nothing is owed to this account" in response.content.decode()
    assert contract.w3().eth.get_transaction_count(user.wallet.address) == nonce


# ---------------------------------------------------------------- the API


def test_api_shows_the_wallet_and_withdraws_to_an_address(client):
    user = buyer_with_refund("uma")
    client.force_login(user)
    outside = Account.create().address

    before = balance(user.wallet.address)

    shown = client.get(reverse("api-wallet")).json()
    done = client.post(reverse("api-wallet-withdraw"), {"to": outside}, "application/json")

    assert shown == {
        "address": user.wallet.address,
        "balance_wei": str(before),
        "credit_wei": str(REFUND),
    }
    assert done.status_code == 200, done.json()
    assert done.json()["amount_wei"] == str(REFUND)
    assert done.json()["to"] == outside
    assert balance(outside) == REFUND
    assert client.get(reverse("api-wallet")).json()["credit_wei"] == "0"


def test_api_refusals_name_their_code_and_move_nothing(client):
    user = buyer_with_refund("vic")
    other = services.user_signup(username="wes", password=PASSWORD)
    services.wallet_fund(wallet=other.wallet)
    url = reverse("api-wallet-withdraw")

    assert client.post(url, {}, "application/json").status_code == 401

    client.force_login(user)
    bad = client.post(url, {"to": "0xnothex"}, "application/json")
    assert (bad.status_code, bad.json()["code"]) == (400, "invalid_address")

    # Another buyer cannot reach this buyer's credit, whatever it names as the destination.
    client.force_login(other)
    theirs = client.post(url, {"to": other.wallet.address}, "application/json")
    assert (theirs.status_code, theirs.json()["code"]) == (409, "nothing_to_withdraw")
    assert credit(user) == REFUND
