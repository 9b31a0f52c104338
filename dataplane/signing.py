"""Signed data-plane requests: EIP-191 over the method, path, host, serving node, time and a
single-use nonce.

A signature names where the request goes twice over: the host (``host:port``) it was sent
to and the serving node's Ethereum address, so it cannot be replayed to another host or
node. It is good for ``window`` seconds either side of the server's clock, and once only:
the server remembers each nonce until its timestamp leaves the window.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import urlsplit

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import is_hex_address

from core.addresses import checksum_address
from dataplane.addresses import authority as authority_of
from dataplane.protocol import (
    DEFAULT_WINDOW_SECONDS,
    HEADER_ADDRESS,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    SCHEME,
    SignatureExpiredError,
    SignatureMalformedError,
    SignatureMismatchError,
    SignatureMissingError,
    SignatureReplayedError,
)

NONCE_HEX_DIGITS = 32


class NonceStore(Protocol):
    """Where a server remembers the nonces it has seen."""

    def claim(self, *, signer: str, nonce: str, expires_at: float) -> bool:
        """True the first time ``(signer, nonce)`` is claimed before ``expires_at`` (unix
        time), False for a replay."""
        ...


class MemoryNonces:
    """Nonces held in this process: for a node's own data-plane server, which is one process.
    Expired entries are dropped as new ones arrive, so memory follows the request rate."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    def claim(self, *, signer: str, nonce: str, expires_at: float) -> bool:
        now = time.time()
        key = (signer.lower(), nonce)
        with self._lock:
            if now >= self._next_sweep:
                self._seen = {k: t for k, t in self._seen.items() if t > now}
                self._next_sweep = now + 10
            if self._seen.get(key, 0) > now:
                return False
            self._seen[key] = expires_at
            return True


def request_message(
    *, method: str, path: str, authority: str, server_address: str, timestamp: int, nonce: str
) -> str:
    """The canonical text a requester signs: one field per line, addresses checksummed."""
    return "\n".join(
        (
            SCHEME,
            method.upper(),
            path,
            authority.lower(),
            checksum_address(server_address),
            str(int(timestamp)),
            nonce,
        )
    )


def sign_request(
    *,
    account: LocalAccount,
    method: str,
    url: str,
    server_address: str,
    timestamp: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Headers that authenticate ``method url`` as ``account`` to the node ``server_address``
    (for the platform's API, the FlexMarket contract's address), once."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    ts = int(time.time()) if timestamp is None else int(timestamp)
    nonce = secrets.token_hex(NONCE_HEX_DIGITS // 2) if nonce is None else nonce
    text = request_message(
        method=method,
        path=path,
        authority=authority_of(url),
        server_address=server_address,
        timestamp=ts,
        nonce=nonce,
    )
    signed = account.sign_message(encode_defunct(text=text))
    return {
        HEADER_ADDRESS: account.address,
        HEADER_TIMESTAMP: str(ts),
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: "0x" + bytes(signed.signature).hex(),
    }


def verify_request(
    *,
    headers: Mapping[str, str],
    method: str,
    path: str,
    authority: str,
    server_address: str,
    nonces: NonceStore,
    now: float | None = None,
    window: int = DEFAULT_WINDOW_SECONDS,
) -> str:
    """The checksummed address that signed this request to this host and server, once.

    ``authority`` is this server's own ``host:port`` as clients address it. ``headers`` must
    look names up case-insensitively (http.server's and Django's do). Raises
    SignatureMissingError, SignatureMalformedError, SignatureExpiredError,
    SignatureMismatchError, SignatureReplayedError.
    """
    values = {}
    for header in (HEADER_ADDRESS, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE):
        value = headers.get(header)
        if not value:
            raise SignatureMissingError(header=header)
        values[header] = value.strip()

    claimed = values[HEADER_ADDRESS]
    if not is_hex_address(claimed):
        raise SignatureMalformedError(header=HEADER_ADDRESS, reason="not a 20-byte hex address")
    raw_ts = values[HEADER_TIMESTAMP]
    if not raw_ts.isdigit() or len(raw_ts) > 12:
        raise SignatureMalformedError(header=HEADER_TIMESTAMP, reason="not unix seconds")
    nonce = values[HEADER_NONCE].lower()
    if len(nonce) != NONCE_HEX_DIGITS or any(c not in "0123456789abcdef" for c in nonce):
        raise SignatureMalformedError(
            header=HEADER_NONCE, reason=f"not {NONCE_HEX_DIGITS} hex digits"
        )
    try:
        signature = bytes.fromhex(values[HEADER_SIGNATURE].removeprefix("0x"))
    except ValueError:
        signature = b""
    if len(signature) != 65:
        raise SignatureMalformedError(header=HEADER_SIGNATURE, reason="not 65 hex-encoded bytes")

    timestamp = int(raw_ts)
    server_time = time.time() if now is None else now
    if abs(int(server_time) - timestamp) > window:
        raise SignatureExpiredError(
            timestamp=timestamp, server_time=int(server_time), window=window
        )

    text = request_message(
        method=method,
        path=path,
        authority=authority,
        server_address=server_address,
        timestamp=timestamp,
        nonce=values[HEADER_NONCE],
    )
    try:
        signer = Account.recover_message(encode_defunct(text=text), signature=signature)
    except Exception:
        # eth-keys rejects out-of-range r/s/v with assorted exception types; to the server
        # each of them means the same thing: this signature proves nothing.
        signer = None
    if signer is None or signer.lower() != claimed.lower():
        raise SignatureMismatchError(claimed=checksum_address(claimed))
    # Only a valid signature spends a nonce: nobody can use up another signer's nonces.
    if not nonces.claim(signer=signer, nonce=nonce, expires_at=timestamp + window + 1):
        raise SignatureReplayedError(nonce=nonce, signer=signer)
    return checksum_address(signer)
