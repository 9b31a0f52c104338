"""Marketplace writes: each validates, writes, then talks to the chain or the broker."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.utils import timezone
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import is_checksum_address, to_checksum_address
from rest_framework.authtoken.models import Token

from chain.client import DEFAULT_SAMPLE_CAP
from chain.errors import (
    BudgetTooLowError,
    InvalidBiddingEndError,
    InvalidDisputeTermsError,
    InvalidRoundTimeoutError,
    InvalidSampleCapError,
    InvalidTaskStateError,
)
from chain.events import DeviceClass as ChainDeviceClass
from chain.events import DeviceRegistered, DeviceRevoked, Strategy, TaskCancelled, TaskCreated
from chain.events import TaskState as ChainTaskState
from chain.node import chain_time, max_fee_per_gas
from chain.records import TxResult
from chain.withdrawals import Withdrawal, withdraw_credit
from core.enrolment import join_message
from dataplane.addresses import dataplane_url_check
from dataplane.tls import pin_check
from marketplace import contract, wallets
from marketplace.device_broker import device_broker_grant, device_broker_remove, device_broker_url
from marketplace.errors import (
    DeviceAlreadyEnrolledError,
    JoinChallengeError,
    JoinSignatureError,
    JoinTokenError,
)
from marketplace.estimates import CREATE_TASK_GAS, task_shape_check
from marketplace.models import (
    Device,
    JoinToken,
    TaskOrder,
    Wallet,
    token_digest,
)
from marketplace.models_download import (
    FORMATS,
    FinalModel,
    ModelNotReadyError,
    NotTaskBuyerError,
    UnknownFormatError,
    final_model_export,
    final_model_fetch,
)
from marketplace.selectors import TaskView
from marketplace.task_lists import task_lists_changed
from marketplace.validation import task_spec_validated
from training.spec import TaskSpec

logger = logging.getLogger(__name__)

CHALLENGE_TTL = timedelta(minutes=5)


@dataclass(frozen=True)
class IssuedToken:
    token: JoinToken
    raw: str


def join_token_issue(
    *, label: str, ttl: timedelta, may_aggregate: bool = False, created_by=None
) -> IssuedToken:
    """A new single-use join token; the raw value is shown once and only its hash is kept."""
    if ttl <= timedelta(0):
        raise JoinTokenError("A join token's lifetime must be positive.", ttl_s=ttl.total_seconds())
    raw = "flexjoin_" + secrets.token_urlsafe(32)
    now = timezone.now()
    token = JoinToken.objects.create(
        label=label,
        digest=token_digest(raw),
        may_aggregate=may_aggregate,
        created_by=created_by,
        created_at=now,
        expires_at=now + ttl,
    )
    logger.info("join token %s issued for %r, expires %s", token.pk, label, token.expires_at)
    return IssuedToken(token=token, raw=raw)


def join_token_revoke(*, token: JoinToken) -> JoinToken:
    if token.used_at is None and token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
    return token


def _usable_token(raw: str) -> JoinToken:
    """The token row, locked, or JoinTokenError saying why it cannot be used."""
    token = JoinToken.objects.select_for_update().filter(digest=token_digest(raw)).first()
    if token is None:
        raise JoinTokenError("Unknown join token.", reason="unknown")
    state = token.status
    if state != "valid":
        raise JoinTokenError(f"This join token is {state}.", reason=state)
    return token


@transaction.atomic
def join_challenge_issue(*, raw_token: str) -> JoinToken:
    """A fresh random challenge for the holder of a valid token to sign."""
    token = _usable_token(raw_token)
    token.challenge = "0x" + secrets.token_hex(32)
    token.challenge_expires_at = timezone.now() + CHALLENGE_TTL
    token.save(update_fields=["challenge", "challenge_expires_at"])
    return token


@transaction.atomic
def device_enrol(
    *,
    raw_token: str,
    address: str,
    signature: str,
    name: str,
    device_class: str,
    dataplane_url: str = "",
    dataplane_cert_sha256: str = "",
    price_per_round_wei: int | None = None,
    aggregator_price_per_round_wei: int | None = None,
) -> Device:
    """Check the token, the signed challenge and where the device's data plane is, register
    the address on chain, record it (with the prices it declares, for cost estimates) under
    ``name``, or the token's label when that is empty.

    ``dataplane_url`` must be a plain https URL of a host (DataPlaneUrlError otherwise; private
    addresses only with FLEX_DATAPLANE_ALLOW_PRIVATE) and comes with the SHA-256 of the TLS
    certificate peers will pin (CertificatePinError). Nothing is registered unless everything
    checks out; a failed chain call rolls the enrolment back and leaves the token usable.
    """
    token = _usable_token(raw_token)
    if dataplane_url or dataplane_cert_sha256:
        dataplane_url = dataplane_url_check(
            dataplane_url, allow_private=settings.FLEX_DATAPLANE_ALLOW_PRIVATE
        )
        dataplane_cert_sha256 = pin_check(dataplane_cert_sha256)
    if not token.challenge or token.challenge_expires_at <= timezone.now():
        raise JoinChallengeError(reason="expired" if token.challenge else "missing")
    try:
        claimed = to_checksum_address(address)
    except ValueError as exc:
        raise JoinSignatureError(f"{address!r} is not an Ethereum address.") from exc
    if address != address.lower() and not is_checksum_address(address):
        raise JoinSignatureError(f"{address!r} has a wrong checksum.")
    message = encode_defunct(text=join_message(challenge=token.challenge, address=claimed))
    try:
        signer = Account.recover_message(message, signature=signature)
    except Exception as exc:  # eth_keys raises several unrelated types for malformed input
        raise JoinSignatureError("The signature is malformed.") from exc
    if signer != claimed:
        raise JoinSignatureError(
            "The signature was not made by the device's key.", claimed=claimed, signer=signer
        )
    if Device.objects.filter(address=claimed).exists():
        raise DeviceAlreadyEnrolledError(address=claimed)
    try:
        device = Device.objects.create(
            name=name.strip() or token.label,
            address=claimed,
            device_class=device_class,
            may_aggregate=token.may_aggregate,
            dataplane_url=dataplane_url,
            dataplane_cert_sha256=dataplane_cert_sha256,
            price_per_round_wei=price_per_round_wei,
            aggregator_price_per_round_wei=(
                aggregator_price_per_round_wei if token.may_aggregate else None
            ),
            join_token=token,
        )
    except IntegrityError as exc:
        raise DeviceAlreadyEnrolledError(address=claimed) from exc
    # Broker access first: a broker that refuses leaves nothing registered on chain.
    device_broker_grant(device=device)
    try:
        # The registrar's lock is held only while its nonce is taken and the registration
        # sent: devices enrolling together are estimated and mined side by side.
        pending = contract.market().register_device_submit(
            sender=contract.registrar(),
            device=claimed,
            device_class=ChainDeviceClass[device_class.upper()],
            can_aggregate=token.may_aggregate,
            sending=contract.platform_account_lock(),
        )
        receipt = pending.result()
    except BaseException:
        device_broker_remove(device=device)
        raise
    token.used_at = timezone.now()
    token.challenge = ""
    token.save(update_fields=["used_at", "challenge"])
    device.registration_tx = receipt.tx_hash
    device.save(update_fields=["registration_tx"])
    contract.fund_gas_on_dev_chain(address=claimed)
    logger.info(
        "device %s enrolled as %s (%s) in %s", device.pk, claimed, device_class, receipt.tx_hash
    )
    return device


def enrolment_config(*, device: Device) -> dict:
    """What an enrolled device needs to start working: chain, broker and its queue."""
    return {
        "device_id": device.pk,
        "name": device.name,
        "address": device.address,
        "device_class": device.device_class,
        "may_aggregate": device.may_aggregate,
        "queues": [device.queue],
        "broker_url": device_broker_url(device=device),
        "eth_rpc_url": settings.FLEX_DEVICE_ETH_RPC_URL or settings.ETH_RPC_URL,
        "chain_id": contract.chain_id(),
        "contract_address": contract.address(),
        "gas_needed_wei": str(contract.gas_needed_wei()),
    }


def device_approve(*, device: Device) -> TxResult:
    """Register a known device on chain (again, if it was revoked) with its recorded class and
    aggregation right, from the registrar account; chain sync mirrors its new status.

    Its broker user comes back with the same credentials, so the device's own config works
    again. Raises BrokerUnavailableError, or the contract's error, e.g.
    DeviceAlreadyRegisteredError for an active device.
    """
    device_broker_grant(device=device)
    with contract.platform_account_lock() as platform:
        receipt = contract.market().register_device(
            sender=platform,
            device=device.address,
            device_class=ChainDeviceClass[device.device_class.upper()],
            can_aggregate=device.may_aggregate,
        )
    receipt.first(DeviceRegistered)
    logger.info("device %s (%s) registered on chain by the admin", device.pk, device.address)
    return receipt


def device_revoke(*, device: Device) -> TxResult:
    """Revoke a device on chain from the registrar account: it can no longer bid, be selected,
    submit or publish; what it already delivered is still paid. Chain sync mirrors the status.

    Its broker user goes first, with its open connections: from then on the device takes no
    work and sends no report. Raises BrokerUnavailableError (then nothing changed), or the
    contract's error: DeviceRevokedError when already revoked, DeviceNotRegisteredError when it
    was never registered.
    """
    device_broker_remove(device=device)
    with contract.platform_account_lock() as platform:
        receipt = contract.market().revoke_device(sender=platform, device=device.address)
    receipt.first(DeviceRevoked)
    logger.info("device %s (%s) revoked on chain by the admin", device.pk, device.address)
    return receipt


# ---------------------------------------------------------------- buyers: wallets and tasks

# Bidding must stay open at least this long after the transaction is sent, or the contract
# may see the deadline pass before the block that carries it.
MIN_BIDDING_WINDOW_S = 5
# The latest bidding end the contract stores (a uint40 of Unix time).
MAX_BIDDING_END = 2**40 - 1


@transaction.atomic
def user_signup(*, username: str, password: str, email: str = ""):
    """A new buyer account with its custodial wallet (both or neither)."""
    user = get_user_model().objects.create_user(username=username, password=password, email=email)
    wallet_create(user=user)
    return user


def user_email_set(*, user, email: str) -> None:
    """Where ``user``'s password-reset links go ("" for nowhere)."""
    user.email = email
    user.save(update_fields=["email"])
    logger.info("email address of user %s %s", user.pk, "changed" if email else "removed")


def user_token_issue(*, user) -> Token:
    """``user``'s API token: the one it has, or a new one (as POST /api/auth/token/ gives)."""
    token, made = Token.objects.get_or_create(user=user)
    if made:
        logger.info("API token of user %s made", user.pk)
    return token


def user_tokens_revoke(*, user) -> int:
    """Deletes ``user``'s API token (what is left of it after a password change: whoever held
    the old password may have made it); the next POST /api/auth/token/ makes a new one."""
    deleted, _ = Token.objects.filter(user=user).delete()
    if deleted:
        logger.info("API token of user %s revoked", user.pk)
    return deleted


def wallet_create(*, user) -> Wallet:
    """A new custodial account for ``user``; only the encrypted key is stored."""
    account = Account.create()
    wallet = Wallet.objects.create(
        user=user,
        address=account.address,
        encrypted_key=wallets.key_encrypt(private_key=bytes(account.key)),
    )
    logger.info("wallet %s created for user %s", wallet.address, user.pk)
    return wallet


def wallet_fund(*, wallet: Wallet) -> str:
    """Send the wallet FLEX_FAUCET_WEI from the dev chain's faucet; returns the tx hash.

    Raises FaucetUnavailableError unless FLEX_DEV_CHAIN is on: real ETH is never handed out.
    """
    if not contract.on_dev_chain():
        raise wallets.FaucetUnavailableError()
    tx_hash = contract.faucet_transfer(to=wallet.address, value_wei=settings.FLEX_FAUCET_WEI)
    logger.info("faucet sent %d wei to %s in %s", settings.FLEX_FAUCET_WEI, wallet.address, tx_hash)
    return tx_hash


def wallet_withdraw(*, wallet: Wallet, to: str | None = None) -> Withdrawal:
    """Take the wallet's whole credit out of the contract, into the wallet or on to ``to``,
    signed with the wallet's key. Raises InvalidAddressError, NothingToWithdrawError,
    InsufficientGasError (nothing sent) or ForwardFailedError (the credit is in the wallet)."""
    done = withdraw_credit(
        market=contract.market(), sender=wallets.wallet_account(wallet=wallet), to=to or None
    )
    logger.info(
        "wallet %s withdrew %d wei to %s (tx %s)",
        wallet.address,
        done.amount_wei,
        done.to,
        done.forward_tx or done.withdraw_tx,
    )
    return done


def task_create(
    *,
    buyer,
    title: str,
    spec: TaskSpec,
    min_trainers: int,
    max_trainers: int,
    round_timeout_s: int,
    budget_wei: int,
    bidding_ends: datetime | None = None,
    bidding_window_s: int | None = None,
    sample_cap: int = DEFAULT_SAMPLE_CAP,
    dispute_window_s: int | None = None,
) -> TaskOrder:
    """Post a task on chain from the buyer's custodial wallet and record the buyer's order.

    Bidding closes at ``bidding_ends``, or ``bidding_window_s`` seconds from the chain's
    time (give one). No trainer's claim counts for more than ``sample_cap`` samples. Each
    global model may be challenged for ``dispute_window_s`` seconds after it is published
    (default: the round timeout), recomputed by the spec's strategy. Every rule
    the contract enforces is checked first, with the contract's own error classes and fields, so
    a bad task costs no gas; a revert that still happens (the chain moved in between) raises the
    same classes. Chain sync mirrors the task itself when it sees TaskCreated (Task, linked to
    the order by the creating transaction). Raises WalletMissingError, InvalidRoundsError,
    InvalidTrainerRangeError, InvalidRoundTimeoutError, InvalidBiddingEndError,
    InvalidSampleCapError, InvalidDisputeTermsError, BudgetTooLowError, InsufficientFundsError,
    any other ContractError, ChainUnavailableError, and ValidationSetUnknownError (a spec
    without a validation set gets its schema's bundled one).
    """
    spec = task_spec_validated(spec=spec, buyer=buyer)
    wallet = wallets.wallet_of(user=buyer)
    market = contract.market()
    limits = market.limits()
    rounds = spec.rounds
    task_shape_check(
        limits=limits, rounds=rounds, min_trainers=min_trainers, max_trainers=max_trainers
    )
    if not 1 <= round_timeout_s <= limits.max_round_timeout:
        raise InvalidRoundTimeoutError(
            round_timeout=round_timeout_s, max_round_timeout=limits.max_round_timeout
        )
    if not 1 <= sample_cap < 2**64:
        raise InvalidSampleCapError(sample_cap=sample_cap)
    if dispute_window_s is None:
        dispute_window_s = round_timeout_s
    strategy = Strategy.of(spec.aggregation.strategy)
    trim = int(dict(spec.aggregation.params).get("trim_per_mille", 0))
    if not 0 <= dispute_window_s <= limits.max_dispute_window:
        raise InvalidDisputeTermsError(
            dispute_window=dispute_window_s, strategy=int(strategy), trim_per_mille=trim
        )
    if (bidding_ends is None) == (bidding_window_s is None):
        raise TypeError("give exactly one of bidding_ends and bidding_window_s")
    now = chain_time(contract.w3())
    ends = int(bidding_ends.timestamp()) if bidding_ends else now + bidding_window_s
    if not now + MIN_BIDDING_WINDOW_S <= ends <= MAX_BIDDING_END:
        raise InvalidBiddingEndError(bidding_ends=ends, now_timestamp=now)
    prices = market.min_prices()
    minimum = rounds * (
        min_trainers * prices.min_trainer_price_wei + prices.min_aggregator_price_wei
    )
    if budget_wei < minimum:
        raise BudgetTooLowError(budget_wei=budget_wei, minimum_wei=minimum)
    balance = wallets.wallet_balance_wei(wallet=wallet)
    needed = budget_wei + CREATE_TASK_GAS * max_fee_per_gas(contract.w3())
    if balance < needed:
        raise wallets.InsufficientFundsError(
            balance_wei=balance, needed_wei=needed, budget_wei=budget_wei
        )

    receipt = market.create_task(
        sender=wallets.wallet_account(wallet=wallet),
        spec_hash=spec.hash,
        rounds=rounds,
        min_trainers=min_trainers,
        max_trainers=max_trainers,
        bidding_ends=ends,
        round_timeout=round_timeout_s,
        budget_wei=budget_wei,
        sample_cap=sample_cap,
        dispute_window=dispute_window_s,
        strategy=strategy,
        trim_per_mille=trim,
    )
    created = receipt.first(TaskCreated)
    order = TaskOrder.objects.create(
        buyer=buyer,
        title=title,
        spec=spec.as_dict(),
        spec_hash=spec.hash_hex,
        buyer_address=wallet.address,
        budget_wei=budget_wei,
        min_trainers=min_trainers,
        max_trainers=max_trainers,
        bidding_ends=datetime.fromtimestamp(ends, tz=UTC),
        round_timeout_s=round_timeout_s,
        dispute_window_s=dispute_window_s,
        sample_cap=sample_cap,
        created_tx=receipt.tx_hash,
        chain_task_id=created.task_id,
    )
    task_lists_changed(buyer_ids=[buyer.pk])
    logger.info(
        "task %s created on chain by %s in %s (budget %d wei)",
        created.task_id,
        wallet.address,
        receipt.tx_hash,
        budget_wei,
    )
    return order


def task_cancel(*, task: TaskView, user) -> TxResult:
    """Cancel the buyer's task while it is still bidding, from the buyer's wallet: the contract
    credits the whole budget back to it (withdrawn from the wallet page). Raises
    NotTaskBuyerError for anyone but the buyer, InvalidTaskStateError once nodes are selected
    or the task is over, ChainUnavailableError."""
    if task.buyer is None or task.buyer.pk != user.pk:
        raise NotTaskBuyerError(task_id=task.id)
    market = contract.market()
    state = market.task(task_id=task.id).state
    if state != ChainTaskState.BIDDING:
        raise InvalidTaskStateError(
            f"The task is {state.name.lower()}: only a task still bidding can be cancelled.",
            task_id=task.id,
            state=state.name.lower(),
        )
    account = wallets.wallet_account(wallet=wallets.wallet_of(user=user))
    receipt = market.cancel_task(sender=account, task_id=task.id)
    receipt.first(TaskCancelled)
    logger.info("task %s cancelled by its buyer in %s", task.id, receipt.tx_hash)
    return receipt


def task_model_download(*, task: TaskView, user, fmt: str = "flexmodel") -> FinalModel:
    """The task's final model, fetched for its buyer from the aggregator's store and checked
    against the model ID on chain: the canonical blob (``fmt`` "flexmodel") or a standard
    format made from it ("keras", "npz"). Raises NotTaskBuyerError for anyone but the buyer
    (it is fetched with the buyer's key), UnknownFormatError, ModelNotReadyError,
    ModelUnavailableError, ModelExportError or the data plane's errors."""
    if fmt not in FORMATS:
        raise UnknownFormatError(format=fmt, formats=list(FORMATS))
    if task.buyer is None or task.buyer.pk != user.pk:
        raise NotTaskBuyerError(task_id=task.id)
    if task.task is None:
        raise ModelNotReadyError("The task is not mirrored from the chain yet.", state=task.state)
    account = wallets.wallet_account(wallet=wallets.wallet_of(user=user))
    if fmt == "flexmodel":
        return final_model_fetch(chain_task_id=task.id, account=account)
    return final_model_export(chain_task_id=task.id, account=account, spec=task.spec, fmt=fmt)
