"""Enrol this machine as a FLEX device with a one-time join token."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import requests
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount

from chain.launcher import free_port
from core.enrolment import join_message
from core.errors import FlexError
from dataplane.tls import node_certificate
from worker import config as config_mod
from worker.config import TLS_DIR, BidPolicy, DeviceConfig, Partition

log = logging.getLogger(__name__)

# The platform's code for "another platform transaction is in flight; try again shortly".
PLATFORM_BUSY = "platform_busy"


class JoinError(FlexError):
    """The platform refused the enrolment."""

    code = "join_refused"


def _post(url: str, payload: dict, *, timeout: float) -> dict:
    try:
        response = requests.post(url, json=payload, timeout=timeout)
    except requests.RequestException as exc:
        raise JoinError(f"cannot reach the platform at {url}: {exc}", url=url) from exc
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code >= 400:
        raise JoinError(
            body.get("message") or f"the platform answered HTTP {response.status_code}",
            status=response.status_code,
            remote_code=body.get("code", "http_error"),
            **body.get("fields", {}),
        )
    return body


def _enrol(base: str, *, token: str, account: LocalAccount, timeout: float, fields: dict) -> dict:
    """One round of the join protocol: a challenge for the token, signed, then registration."""
    challenge = _post(f"{base}/api/join/challenge/", {"token": token}, timeout=timeout)
    text = join_message(challenge=challenge["challenge"], address=account.address)
    signature = account.sign_message(encode_defunct(text=text)).signature
    return _post(
        f"{base}/api/join/complete/",
        {
            "token": token,
            "address": account.address,
            "signature": "0x" + bytes(signature).hex(),
            **fields,
        },
        timeout=timeout,
    )


def join(
    *,
    server_url: str,
    token: str,
    account: LocalAccount,
    home: Path,
    name: str | None,
    device_class: str,
    policy: BidPolicy,
    data_path: str | None = None,
    partition: Partition | None = None,
    dataplane_host: str = "127.0.0.1",
    dataplane_port: int = 0,
    dataplane_url: str | None = None,
    eth_rpc_url: str | None = None,
    # Longer than the platform waits for its registrar account (30 s) before answering busy.
    timeout: float = 90.0,
    busy_retries: int = 8,
) -> DeviceConfig:
    """Prove possession of ``account``'s key, have the platform register it on chain with
    where its data plane is, and write the device's config under ``home``.

    The data plane listens on ``dataplane_host:dataplane_port`` (a free port by default) and
    is advertised at ``dataplane_url`` (by default ``https://dataplane_host:port``, which
    needs a host peers can reach). Its TLS certificate is made here, under ``home``; the
    platform records its fingerprint for peers to pin. ``eth_rpc_url`` replaces the chain URL
    the platform advertises, for a device that reaches the node another way. While the
    platform answers that it is busy registering other devices, it is asked again up to
    ``busy_retries`` times. Raises JoinError with the platform's reason.
    """
    base = server_url.rstrip("/")
    port = dataplane_port or free_port()
    if dataplane_url is None:
        if dataplane_host in ("", "0.0.0.0", "::"):
            raise JoinError(
                f"the data plane listens on every interface ({dataplane_host or '*'}): say "
                "where peers reach it with --dataplane-url https://HOST:PORT",
                dataplane_host=dataplane_host,
            )
        shown = f"[{dataplane_host}]" if ":" in dataplane_host else dataplane_host
        dataplane_url = f"https://{shown}:{port}"
    certificate = node_certificate(home / TLS_DIR, common_name=account.address)
    fields = {
        "name": name or "",  # none: the platform names it as the token's label
        "device_class": device_class,
        "dataplane_url": dataplane_url,
        "dataplane_cert_sha256": certificate.sha256,
        # For buyers' cost estimates until the device bids (wei as exact strings).
        "price_per_round_wei": str(policy.price_per_round_wei),
        "aggregator_price_per_round_wei": (
            None
            if policy.aggregator_price_per_round_wei is None
            else str(policy.aggregator_price_per_round_wei)
        ),
    }
    # The platform registers devices from one account, one transaction at a time; when many
    # enrol at once it may answer "busy": the token is still good, so ask again a little later.
    for attempt in range(busy_retries + 1):
        try:
            enrolled = _enrol(base, token=token, account=account, timeout=timeout, fields=fields)
            break
        except JoinError as exc:
            if exc.fields.get("remote_code") != PLATFORM_BUSY or attempt == busy_retries:
                raise
            log.info("the platform is busy registering other devices; asking again")
            time.sleep(min(2**attempt, 10))
    cfg = DeviceConfig(
        server_url=base,
        name=enrolled["name"],
        device_id=enrolled["device_id"],
        address=enrolled["address"],
        device_class=enrolled["device_class"],
        may_aggregate=enrolled["may_aggregate"],
        queues=enrolled["queues"],
        broker_url=enrolled["broker_url"],
        eth_rpc_url=eth_rpc_url or enrolled["eth_rpc_url"],
        chain_id=enrolled["chain_id"],
        contract_address=enrolled["contract_address"],
        data_path=data_path,
        partition=partition,
        policy=policy,
        dataplane_host=dataplane_host,
        dataplane_port=port,
        dataplane_url=dataplane_url,
    )
    config_mod.save(home, cfg)
    log.info("enrolled as device %s (%s); config in %s", cfg.device_id, cfg.address, home)
    return cfg
