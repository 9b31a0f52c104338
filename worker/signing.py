"""Data-plane request authentication: EIP-191 signatures over method, path, server and time."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import Any

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import is_hex_address, to_checksum_address

from chain.errors import FlexError

HEADER_ADDRESS = "X-Flex-Address"
HEADER_TIMESTAMP = "X-Flex-Timestamp"
HEADER_SIGNATURE = "X-Flex-Signature"
# Allowed clock difference between requester and server, both ways. Long enough for devices
# whose clocks drift, short enough that a captured request is soon worthless.
DEFAULT_WINDOW_SECONDS = 60
# Versioned so that a signature over one message shape can never verify under another.
_SCHEME = "FLEX-DATAPLANE-V1"


class DataPlaneError(FlexError):
    """A data-plane request failed."""

    code = "dataplane_error"
    status: int = 500

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Keep the fields when the error crosses a process boundary (Celery pickles it).
        return (functools.partial(type(self), self.message, **self.fields), ())


class AuthError(DataPlaneError):
    """The request's signature does not authenticate it."""

    code = "auth_failed"
    status = 401


class SignatureMissingError(AuthError):
    """The request is not signed."""

    code = "auth_missing"

    def default_message(self, *, header: str = "?", **_: Any) -> str:
        return f"unsigned request: header {header} is missing"


class SignatureMalformedError(AuthError):
    """A signature header is malformed."""

    code = "auth_malformed"

    def default_message(self, *, header: str = "?", reason: str = "malformed", **_: Any) -> str:
        return f"header {header}: {reason}"


class SignatureMismatchError(AuthError):
    """The signature was not made by the claimed address for this request and this server."""

    code = "auth_bad_signature"

    def default_message(self, *, claimed: str = "?", **_: Any) -> str:
        return f"signature does not match {claimed} for this method, path, server and timestamp"


class SignatureExpiredError(AuthError):
    """The request's timestamp is outside the accepted window."""

    code = "auth_expired"

    def default_message(
        self, *, timestamp: int = 0, server_time: int = 0, window: int = 0, **_: Any
    ) -> str:
        return (
            f"request timestamp {timestamp} is {abs(server_time - timestamp)} s away from the "
            f"server's clock {server_time} (window {window} s); check the clocks"
        )


def request_message(*, method: str, path: str, server_address: str, timestamp: int) -> str:
    """The canonical text a requester signs: one field per line, addresses checksummed."""
    return "\n".join(
        (_SCHEME, method.upper(), path, to_checksum_address(server_address), str(int(timestamp)))
    )


def sign_request(
    *,
    account: LocalAccount,
    method: str,
    path: str,
    server_address: str,
    timestamp: int | None = None,
) -> dict[str, str]:
    """Headers that authenticate ``method path`` as ``account`` to the node ``server_address``."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    text = request_message(method=method, path=path, server_address=server_address, timestamp=ts)
    signed = account.sign_message(encode_defunct(text=text))
    return {
        HEADER_ADDRESS: account.address,
        HEADER_TIMESTAMP: str(ts),
        HEADER_SIGNATURE: "0x" + bytes(signed.signature).hex(),
    }


def verify_request(
    *,
    headers: Mapping[str, str],
    method: str,
    path: str,
    server_address: str,
    now: float | None = None,
    window: int = DEFAULT_WINDOW_SECONDS,
) -> str:
    """The checksummed address that signed this request to this server.

    ``headers`` must look names up case-insensitively (http.server's and requests' do).
    Raises SignatureMissingError, SignatureMalformedError, SignatureExpiredError,
    SignatureMismatchError.
    """
    values = {}
    for header in (HEADER_ADDRESS, HEADER_TIMESTAMP, HEADER_SIGNATURE):
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
    try:
        signature = bytes.fromhex(values[HEADER_SIGNATURE].removeprefix("0x"))
    except ValueError:
        signature = b""
    if len(signature) != 65:
        raise SignatureMalformedError(header=HEADER_SIGNATURE, reason="not 65 hex-encoded bytes")

    timestamp = int(raw_ts)
    server_time = int(time.time() if now is None else now)
    if abs(server_time - timestamp) > window:
        raise SignatureExpiredError(timestamp=timestamp, server_time=server_time, window=window)

    text = request_message(
        method=method, path=path, server_address=server_address, timestamp=timestamp
    )
    try:
        signer = Account.recover_message(encode_defunct(text=text), signature=signature)
    except Exception:
        # eth-keys rejects out-of-range r/s/v with assorted exception types; to the server
        # each of them means the same thing: this signature proves nothing.
        signer = None
    if signer is None or signer.lower() != claimed.lower():
        raise SignatureMismatchError(claimed=to_checksum_address(claimed))
    return to_checksum_address(signer)
