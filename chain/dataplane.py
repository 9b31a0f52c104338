"""The data-plane protocol shared by every node and the platform: signed requests, the
errors a node answers with, and the client that fetches a model blob and checks its ID."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import requests
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak
from eth_utils import is_hex_address, to_checksum_address

from chain.errors import FlexError
from training.errors import BlobNotFoundError, ModelIdMismatchError
from training.serialize import id_hex, parse_id

log = logging.getLogger(__name__)

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


# Refuse to serve or fetch blobs above this by default (as worker.config's max_model_bytes).
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
MODELS_PATH = "/models/"
_CHUNK_BYTES = 1 << 20


class AccessDeniedError(DataPlaneError):
    """The access policy does not let this requester fetch this model."""

    code = "access_denied"
    status = 403

    def default_message(
        self, *, requester: str = "?", model_id: str = "?", reason: str = "not allowed", **_: Any
    ) -> str:
        return f"{requester} may not fetch model {model_id}: {reason}"


class ModelTooLargeError(DataPlaneError):
    """The model blob is larger than the size limit."""

    code = "model_too_large"
    status = 413

    def default_message(
        self, *, model_id: str = "?", size: int = 0, limit: int = 0, **_: Any
    ) -> str:
        return f"model {model_id} is {size} bytes, over the limit of {limit} bytes"


class ModelIdMalformedError(DataPlaneError):
    """The request names no valid model ID."""

    code = "model_id_malformed"
    status = 400

    def default_message(self, *, value: str = "?", **_: Any) -> str:
        return f"not a model ID (0x + 64 hex digits): {value!r}"


class RouteNotFoundError(DataPlaneError):
    """The data plane has no such route."""

    code = "route_not_found"
    status = 404

    def default_message(self, *, path: str = "?", **_: Any) -> str:
        return f"no data-plane route {path}; try GET {MODELS_PATH}<0x model id> or GET /health"


class PolicyUnavailableError(DataPlaneError):
    """The access policy could not decide right now (e.g. the chain is unreachable)."""

    code = "policy_unavailable"
    status = 503


class FetchTruncatedError(DataPlaneError):
    """The peer's response ended before all the bytes it announced."""

    code = "fetch_truncated"

    def default_message(
        self, *, url: str = "?", expected_bytes: int = 0, received_bytes: int = 0, **_: Any
    ) -> str:
        return (
            f"truncated response from {url}: {received_bytes} of {expected_bytes} bytes "
            "(Content-Length) received"
        )


class FetchFailedError(DataPlaneError):
    """The peer could not be reached or kept failing."""

    code = "fetch_failed"

    def default_message(
        self, *, url: str = "?", attempts: int = 0, reason: str = "?", **_: Any
    ) -> str:
        return f"fetching {url} failed after {attempts} attempt(s): {reason}"


class FetchRefusedError(DataPlaneError):
    """The peer refused the request with an answer this client does not know."""

    code = "fetch_refused"

    def default_message(self, *, url: str = "?", status: int = 0, **_: Any) -> str:
        return f"{url} answered HTTP {status}"


# Errors a peer sends back by code, so that the client raises the same class the server did.
_REMOTE_ERRORS: dict[str, type[FlexError]] = {
    cls.code: cls
    for cls in (
        AuthError,
        SignatureMissingError,
        SignatureMalformedError,
        SignatureMismatchError,
        SignatureExpiredError,
        AccessDeniedError,
        ModelTooLargeError,
        ModelIdMalformedError,
        RouteNotFoundError,
        PolicyUnavailableError,
        BlobNotFoundError,
    )
}
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


def fetch_model(
    *,
    base_url: str,
    model_id: bytes | str,
    server_address: str,
    account: LocalAccount,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 0.5,
    session: requests.Session | None = None,
) -> bytes:
    """Fetch a model blob from the data plane at ``base_url`` and check it against its ID.

    ``server_address`` is the serving node's Ethereum address (the request is signed for it
    alone). Connection errors, truncated bodies and 5xx/429 answers are retried ``retries``
    times with exponential back-off; the peer's refusals are raised at once as the server's
    own error class (AuthError subclasses, AccessDeniedError, BlobNotFoundError, ...).
    Raises ModelTooLargeError (over ``max_bytes``), FetchTruncatedError (fewer bytes than
    Content-Length), ModelIdMismatchError (bytes hash to another ID; both IDs in the error),
    FetchFailedError (unreachable after all retries), FetchRefusedError (unknown refusals).
    """
    wanted = id_hex(parse_id(model_id))
    url = base_url.rstrip("/") + MODELS_PATH + wanted
    path = urlsplit(url).path
    own_session = session is None
    http = requests.Session() if session is None else session
    attempts = retries + 1
    try:
        for attempt in range(1, attempts + 1):
            started = time.monotonic()
            try:
                blob = _fetch_once(
                    http=http,
                    url=url,
                    path=path,
                    model_id=wanted,
                    server_address=server_address,
                    account=account,
                    max_bytes=max_bytes,
                    timeout=timeout,
                )
            except (requests.ConnectionError, requests.Timeout, _RetryableError) as exc:
                error = exc.error if isinstance(exc, _RetryableError) else exc
                if attempt == attempts:
                    if isinstance(error, FlexError):
                        raise error from None
                    raise FetchFailedError(
                        url=url, model_id=wanted, attempts=attempts, reason=repr(error)
                    ) from error
                delay = backoff * 2 ** (attempt - 1)
                log.warning(
                    "fetch of model %s from %s failed (%s); retry %d of %d in %.2fs",
                    wanted,
                    url,
                    getattr(error, "message", None) or repr(error),
                    attempt,
                    retries,
                    delay,
                )
                time.sleep(delay)
                continue
            log.info(
                "fetched model %s (%d bytes) from %s in %.2fs",
                wanted,
                len(blob),
                url,
                time.monotonic() - started,
            )
            return blob
    finally:
        if own_session:
            http.close()
    raise AssertionError("unreachable")  # the loop returns or raises


class _RetryableError(Exception):
    """Carries a FLEX error that is worth another attempt (truncation, 5xx)."""

    def __init__(self, error: FlexError) -> None:
        super().__init__(error.message)
        self.error = error


def _fetch_once(
    *,
    http: requests.Session,
    url: str,
    path: str,
    model_id: str,
    server_address: str,
    account: LocalAccount,
    max_bytes: int,
    timeout: float,
) -> bytes:
    headers = sign_request(account=account, method="GET", path=path, server_address=server_address)
    # Content-Length must count the blob's own bytes: no transfer encoding of the body.
    headers["Accept-Encoding"] = "identity"
    with http.get(
        url, headers=headers, stream=True, timeout=timeout, allow_redirects=False
    ) as response:
        if response.status_code != HTTPStatus.OK:
            error = _remote_error(response, url=url, model_id=model_id)
            if response.status_code in _RETRY_STATUSES:
                raise _RetryableError(error)
            raise error
        announced = response.headers.get("Content-Length", "")
        expected = int(announced) if announced.isdigit() else None
        if expected is not None and expected > max_bytes:
            raise ModelTooLargeError(model_id=model_id, size=expected, limit=max_bytes, url=url)
        # Count the bytes ourselves: urllib3's own Content-Length check raises without saying
        # how much arrived, and a truncation report should.
        response.raw.enforce_content_length = False
        hasher = keccak.new(b"")
        buffer = io.BytesIO()
        received = 0
        for chunk in response.iter_content(_CHUNK_BYTES):
            received += len(chunk)
            if received > max_bytes:
                raise ModelTooLargeError(
                    f"model {model_id} from {url} exceeds the limit of {max_bytes} bytes",
                    model_id=model_id,
                    size=received,
                    limit=max_bytes,
                    url=url,
                )
            hasher.update(chunk)
            buffer.write(chunk)
        if expected is not None and received != expected:
            raise _RetryableError(
                FetchTruncatedError(
                    url=url, model_id=model_id, expected_bytes=expected, received_bytes=received
                )
            )
    actual = "0x" + hasher.digest().hex()
    if actual != model_id:
        raise ModelIdMismatchError(expected=model_id, actual=actual, url=url, size=received)
    return buffer.getvalue()


def _remote_error(response: requests.Response, *, url: str, model_id: str) -> FlexError:
    """The peer's JSON error as the matching FLEX error class, or FetchRefusedError."""
    status = response.status_code
    try:
        # A peer's error body is small; read a bounded prefix rather than trust its length.
        body = json.loads(response.raw.read(64 * 1024, decode_content=True) or b"null")
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    code = body.get("code")
    remote_fields = body.get("fields")
    fields = {
        str(k): v
        for k, v in (remote_fields.items() if isinstance(remote_fields, dict) else ())
        if k != "message"
    }
    fields.update(url=url, status=status)
    fields.setdefault("model_id", model_id)
    message = body.get("message")
    cls = _REMOTE_ERRORS.get(code) if isinstance(code, str) else None
    if cls is None:
        return FetchRefusedError(
            f"{url} answered HTTP {status}: {message or response.reason}",
            remote_code=code,
            **fields,
        )
    return cls(f"{url}: {message}" if isinstance(message, str) else None, **fields)
