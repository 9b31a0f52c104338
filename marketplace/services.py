"""Marketplace writes: each validates, writes, then talks to the chain or the broker."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import is_checksum_address, to_checksum_address

from chain.client import DeviceClass as ChainDeviceClass
from chain.messages import join_message
from marketplace import contract
from marketplace.errors import (
    DeviceAlreadyEnrolledError,
    JoinChallengeError,
    JoinSignatureError,
    JoinTokenError,
)
from marketplace.models import Device, JoinToken, token_digest

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
) -> Device:
    """Check the token and the signed challenge, register the address on chain, record it.

    Nothing is registered unless everything checks out; a failed chain call rolls the
    enrolment back and leaves the token usable.
    """
    token = _usable_token(raw_token)
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

    market = contract.market()
    receipt = market.register_device(
        sender=contract.registrar(),
        device=claimed,
        device_class=ChainDeviceClass[device_class.upper()],
        can_aggregate=token.may_aggregate,
    )
    token.used_at = timezone.now()
    token.challenge = ""
    token.save(update_fields=["used_at", "challenge"])
    try:
        device = Device.objects.create(
            name=name,
            address=claimed,
            device_class=device_class,
            may_aggregate=token.may_aggregate,
            dataplane_url=dataplane_url,
            join_token=token,
            registration_tx=receipt.tx_hash,
        )
    except IntegrityError as exc:
        raise DeviceAlreadyEnrolledError(address=claimed) from exc
    contract.fund_gas_on_dev_chain(address=claimed)
    logger.info("device %s enrolled as %s (%s)", device.pk, claimed, device_class)
    return device


def enrolment_config(*, device: Device) -> dict:
    """What an enrolled device needs to start working: chain, broker and its queues."""
    from flexsite.celery import AGGREGATE_QUEUE, TRAIN_QUEUES

    return {
        "device_id": device.pk,
        "address": device.address,
        "device_class": device.device_class,
        "may_aggregate": device.may_aggregate,
        "queues": [device.queue, TRAIN_QUEUES[device.device_class]]
        + ([AGGREGATE_QUEUE] if device.may_aggregate else []),
        "broker_url": settings.FLEX_DEVICE_BROKER_URL or settings.REDIS_URL,
        "eth_rpc_url": settings.ETH_RPC_URL,
        "chain_id": contract.chain_id(),
        "contract_address": contract.address(),
        "gas_needed_wei": str(contract.gas_needed_wei()),
    }
