"""Buyers' custodial wallets: created at sign-up, encrypted at rest, funded by the dev faucet."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from django.contrib.auth import get_user_model
from django.urls import reverse
from eth_account import Account

from chain.launcher import free_port
from marketplace import services, wallets
from marketplace.models import Wallet

pytestmark = pytest.mark.django_db

PASSWORD = "a-long-enough-passphrase-42"


def _sign_up(client, username="ada"):
    return client.post(
        reverse("signup"),
        {"username": username, "password1": PASSWORD, "password2": PASSWORD},
    )


def test_sign_up_creates_an_encrypted_wallet_and_logs_in(client):
    response = _sign_up(client)

    assert response.status_code == 302
    assert response.url == reverse("wallet")
    user = get_user_model().objects.get(username="ada")
    wallet = Wallet.objects.get(user=user)
    key = wallets.key_decrypt(token=wallet.encrypted_key)
    assert Account.from_key(key).address == wallet.address
    # Neither the key's hex nor its raw bytes appear in what is stored.
    assert key.hex() not in wallet.encrypted_key.lower()
    assert key not in wallet.encrypted_key.encode()
    assert wallets.wallet_account(wallet=wallet).address == wallet.address
    page = client.get(reverse("wallet"))
    assert wallet.address in page.content.decode()


def test_sign_up_with_bad_password_creates_nothing(client):
    response = client.post(
        reverse("signup"), {"username": "bob", "password1": "123", "password2": "123"}
    )

    assert response.status_code == 200
    assert "password2" in response.context["form"].errors
    assert not get_user_model().objects.filter(username="bob").exists()
    assert not Wallet.objects.exists()


def test_configured_wallet_key_encrypts_and_rotates(settings):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.FLEX_WALLET_KEY = old
    user = services.user_signup(username="carol", password=PASSWORD)
    token = user.wallet.encrypted_key

    # The key derived from SECRET_KEY cannot open it...
    settings.FLEX_WALLET_KEY = ""
    with pytest.raises(wallets.WalletKeyError):
        wallets.key_decrypt(token=token)
    # ...while a rotated configuration (new key first, old key still listed) can.
    settings.FLEX_WALLET_KEY = f"{new},{old}"
    assert wallets.wallet_account(wallet=user.wallet).address == user.wallet.address


def test_key_of_another_wallet_is_refused():
    a = services.user_signup(username="dora", password=PASSWORD).wallet
    b = services.user_signup(username="eve", password=PASSWORD).wallet
    b.encrypted_key = a.encrypted_key

    with pytest.raises(wallets.WalletKeyError) as exc:
        wallets.wallet_account(wallet=b)

    assert exc.value.code == "wallet_key_invalid"


def test_faucet_funds_the_wallet_on_the_dev_chain(client, settings):
    user = services.user_signup(username="fay", password=PASSWORD)
    client.force_login(user)
    before = wallets.wallet_balance_wei(wallet=user.wallet)

    page = client.get(reverse("wallet"))
    assert b'id="faucet"' in page.content
    response = client.post(reverse("wallet-fund"))

    assert response.status_code == 302
    assert wallets.wallet_balance_wei(wallet=user.wallet) == before + settings.FLEX_FAUCET_WEI


def test_faucet_is_hidden_and_refused_without_the_dev_chain_setting(client, settings):
    # The session's chain is Anvil (chain id 31337): the setting alone decides.
    settings.FLEX_WALLET_KEY = Fernet.generate_key().decode()
    user = services.user_signup(username="gus", password=PASSWORD)
    client.force_login(user)
    settings.FLEX_DEV_CHAIN = False
    before = wallets.wallet_balance_wei(wallet=user.wallet)

    page = client.get(reverse("wallet"))
    response = client.post(reverse("wallet-fund"))

    assert b'id="faucet"' not in page.content
    assert response.status_code == 403
    assert wallets.wallet_balance_wei(wallet=user.wallet) == before
    with pytest.raises(wallets.FaucetUnavailableError):
        services.wallet_fund(wallet=user.wallet)


def test_wallet_page_without_the_chain_still_renders(client, settings):
    user = services.user_signup(username="hal", password=PASSWORD)
    client.force_login(user)
    settings.ETH_RPC_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    page = client.get(reverse("wallet"))

    assert page.status_code == 200
    assert b"chain unreachable" in page.content
    assert b'id="faucet"' not in page.content


def test_accounts_made_outside_sign_up_get_a_wallet_on_first_use(client, django_user_model):
    admin = django_user_model.objects.create_superuser(username="root", password=PASSWORD)
    client.force_login(admin)

    client.get(reverse("wallet"))

    assert Wallet.objects.get(user=admin).address.startswith("0x")


def test_wallet_pages_need_a_login(client):
    assert client.get(reverse("wallet")).status_code == 302
    assert client.post(reverse("wallet-fund")).status_code == 302
