"""Signed data-plane requests: EIP-191 over the method, path, serving node and time."""

from __future__ import annotations

import time
from collections.abc import Mapping

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import is_hex_address, to_checksum_address

from dataplane.protocol import (
    DEFAULT_WINDOW_SECONDS,
    HEADER_ADDRESS,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    SCHEME,
    SignatureExpiredError,
    SignatureMalformedError,
    SignatureMismatchError,
    SignatureMissingError,
)


def request_message(*, method: str, path: str, server_address: str, timestamp: int) -> str:
    """The canonical text a requester signs: one field per line, addresses checksummed."""
    return "\n".join(
        (SCHEME, method.upper(), path, to_checksum_address(server_address), str(int(timestamp)))
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
