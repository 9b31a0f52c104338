"""Buyers' custodial Ethereum keys: generated here, kept encrypted at rest, opened only to sign.

Keys are encrypted with Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``). The
Fernet key is FLEX_WALLET_KEY (urlsafe base64 of 32 bytes; several comma-separated keys
allow rotation: the first encrypts, any of them decrypts). It is required, except on the dev
chain (FLEX_DEV_CHAIN), where a key derived from SECRET_KEY with HKDF-SHA256 stands in when it
is unset, so a local checkout works out of the box; a deployment holding real ETH never
encrypts with a key that rotating SECRET_KEY would lose.
"""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from eth_account import Account
from eth_account.signers.local import LocalAccount

from chain.node import reachable
from chain.withdrawals import Balance, balance_of
from core.errors import FlexError
from marketplace import contract
from marketplace.models import Wallet

# Fixed HKDF salt and context: changing either would orphan every wallet encrypted so far.
_HKDF_SALT = b"flex-wallet-key-v1"
_HKDF_INFO = b"flex custodial wallet encryption"


class WalletKeyError(FlexError):
    """The wallet's key cannot be decrypted with the configured wallet keys."""

    code = "wallet_key_invalid"


class WalletMissingError(FlexError):
    """This account has no wallet."""

    code = "wallet_missing"


class InsufficientFundsError(FlexError):
    """The wallet does not hold enough ETH for this."""

    code = "insufficient_funds"


class FaucetUnavailableError(FlexError):
    """The faucet exists only on the dev chain (FLEX_DEV_CHAIN)."""

    code = "faucet_unavailable"


def _derived_key() -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=_HKDF_INFO)
    return base64.urlsafe_b64encode(hkdf.derive(settings.SECRET_KEY.encode()))


def _cipher() -> MultiFernet:
    configured = [k.strip() for k in settings.FLEX_WALLET_KEY.split(",") if k.strip()]
    if not configured and not settings.FLEX_DEV_CHAIN:
        raise WalletKeyError(
            "FLEX_WALLET_KEY is not set: wallets are encrypted with a key derived from "
            "SECRET_KEY only on the dev chain (FLEX_DEV_CHAIN)."
        )
    keys = configured or [_derived_key()]
    try:
        return MultiFernet([Fernet(k) for k in keys])
    except ValueError as exc:
        raise WalletKeyError(
            "FLEX_WALLET_KEY must be urlsafe base64 of 32 bytes (Fernet.generate_key())."
        ) from exc


def key_encrypt(*, private_key: bytes) -> str:
    return _cipher().encrypt(private_key).decode("ascii")


def key_decrypt(*, token: str) -> bytes:
    try:
        return _cipher().decrypt(token.encode("ascii"))
    except InvalidToken as exc:
        raise WalletKeyError() from exc


def wallet_account(*, wallet: Wallet) -> LocalAccount:
    """The wallet's signing account; checks the key belongs to the wallet's address."""
    account = Account.from_key(key_decrypt(token=wallet.encrypted_key))
    if account.address != wallet.address:
        # A ciphertext copied onto another row must not sign for that row's address.
        raise WalletKeyError("The wallet's key does not match its address.", address=wallet.address)
    return account


def wallet_of(*, user) -> Wallet:
    try:
        return user.wallet
    except Wallet.DoesNotExist:
        raise WalletMissingError(user=str(user)) from None


def wallet_balance_wei(*, wallet: Wallet) -> int:
    """The wallet's balance on chain; ChainUnavailableError when the node cannot be reached."""
    with reachable():
        return contract.w3().eth.get_balance(wallet.address)


def wallet_holdings(*, wallet: Wallet) -> Balance:
    """The wallet's ETH and its credit in the contract (pay-outs and refunds not yet
    withdrawn); ChainUnavailableError when the node cannot be reached."""
    return balance_of(market=contract.market(), address=wallet.address)


def faucet_available() -> bool:
    """Whether the faucet button is offered: only with dev-chain behaviour on."""
    return contract.on_dev_chain()
