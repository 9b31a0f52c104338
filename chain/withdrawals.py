"""Taking a credit out of FlexMarket: to the account that earned it, or on to another address.

The contract pays pull payments to the caller only (``withdraw()``), so sending a credit
elsewhere is two transactions from the account: the withdrawal, then a plain transfer of the
withdrawn amount. Both are paid for from the account's own balance, checked before the first
is sent, so that a withdrawal never strands half-way for want of gas.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_account.signers.local import LocalAccount
from eth_utils import is_checksum_address, is_hex_address, to_checksum_address

from chain.client import FlexMarket
from chain.errors import NothingToWithdrawError
from chain.events import Withdrawn
from chain.node import max_fee_per_gas, reachable
from chain.transactions import send
from core.errors import FlexError

# Gas budgeted before sending: withdraw() uses about 36k (docs/contract.md); a transfer to a
# plain account 21k. The check only keeps an account from starting what it cannot finish.
WITHDRAW_GAS = 60_000
TRANSFER_GAS = 21_000


class InvalidAddressError(FlexError):
    """Not an Ethereum address to send ETH to."""

    code = "invalid_address"


class InsufficientGasError(FlexError):
    """The account holds too little ETH to pay the gas of the withdrawal."""

    code = "insufficient_gas"


class ForwardFailedError(FlexError):
    """The credit was withdrawn to the account, but sending it on failed; it is in the account."""

    code = "forward_failed"


@dataclass(frozen=True)
class Balance:
    """What an account holds: ETH in the account itself and its credit in the contract."""

    address: str
    wallet_wei: int
    credit_wei: int


@dataclass(frozen=True)
class Withdrawal:
    """A credit taken out: ``amount_wei`` reached ``to``; the account paid ``fee_wei`` in gas."""

    account: str
    amount_wei: int
    to: str
    withdraw_tx: str
    forward_tx: str | None
    fee_wei: int


def balance_of(*, market: FlexMarket, address: str) -> Balance:
    """The account's ETH and its withdrawable credit; ChainUnavailableError without a node."""
    address = to_checksum_address(address)
    with reachable():
        wallet = market.w3.eth.get_balance(address)
    return Balance(address=address, wallet_wei=wallet, credit_wei=market.credit_of(account=address))


def destination(value: str, *, market: FlexMarket) -> str:
    """``value`` as a checksummed address to send ETH to. Raises InvalidAddressError for what
    is not a 20-byte hex address, has a wrong checksum, or is the contract itself (which
    takes no plain ETH)."""
    text = value.strip()
    if not is_hex_address(text):
        raise InvalidAddressError(f"{value!r} is not a 20-byte hex Ethereum address.", to=value)
    if text != text.lower() and not is_checksum_address(text):
        raise InvalidAddressError(
            f"{value!r} has a wrong checksum: check it was copied whole.", to=value
        )
    address = to_checksum_address(text)
    if address == to_checksum_address(market.address):
        raise InvalidAddressError("That is the FlexMarket contract's own address.", to=value)
    return address


def withdraw_credit(
    *, market: FlexMarket, sender: LocalAccount, to: str | None = None
) -> Withdrawal:
    """Withdraw ``sender``'s whole credit, and send it on to ``to`` when that is another
    address. Raises InvalidAddressError, NothingToWithdrawError (no credit, nothing sent),
    InsufficientGasError (nothing sent), ForwardFailedError (withdrawn, not sent on)."""
    target = destination(to, market=market) if to else sender.address
    forward = target != sender.address
    held = balance_of(market=market, address=sender.address)
    if held.credit_wei == 0:
        raise NothingToWithdrawError(account=sender.address)
    needed = (WITHDRAW_GAS + (TRANSFER_GAS if forward else 0)) * max_fee_per_gas(market.w3)
    if held.wallet_wei < needed:
        raise InsufficientGasError(
            f"{sender.address} holds {held.wallet_wei} wei; the withdrawal's gas may cost up "
            f"to {needed} wei. Send it some ETH first.",
            account=sender.address,
            balance_wei=held.wallet_wei,
            needed_wei=needed,
        )
    receipt = market.withdraw(sender=sender)
    amount = receipt.first(Withdrawn).amount_wei
    fee = receipt.fee_wei
    forward_tx = None
    if forward:
        try:
            sent = send(market.w3, sender, {"to": target, "value": amount})
        except FlexError as exc:
            raise ForwardFailedError(
                f"{amount} wei were withdrawn to {sender.address} (tx {receipt.tx_hash}), but "
                f"sending them to {target} failed: {exc.message}",
                account=sender.address,
                to=target,
                amount_wei=amount,
                withdraw_tx=receipt.tx_hash,
            ) from exc
        forward_tx = "0x" + bytes(sent["transactionHash"]).hex()
        fee += sent["gasUsed"] * sent["effectiveGasPrice"]
    return Withdrawal(
        account=sender.address,
        amount_wei=amount,
        to=target,
        withdraw_tx=receipt.tx_hash,
        forward_tx=forward_tx,
        fee_wei=fee,
    )
