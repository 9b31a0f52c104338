"""Fetching a model blob from a node's data plane, checked against its model ID."""

from __future__ import annotations

import io
import json
import logging
import time
from http import HTTPStatus
from urllib.parse import urlsplit

import requests
from eth_account.signers.local import LocalAccount

from core.errors import FlexError
from dataplane.protocol import (
    DEFAULT_MAX_BYTES,
    MODELS_PATH,
    REMOTE_ERRORS,
    FetchFailedError,
    FetchRefusedError,
    FetchTruncatedError,
    ModelTooLargeError,
)
from dataplane.signing import sign_request
from training.errors import ModelBlobError
from training.serialize import id_hex, parse_id
from training.verifier import BlobVerifier

log = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20
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
    Content-Length), a ModelBlobError subclass as soon as the streamed bytes show they are
    not the model: ModelIdMismatchError (header and leaves name another ID; both IDs in the
    error, raised before any value is read), ChunkMismatchError (a chunk does not match its
    leaf), BlobHeaderError, BlobTooLongError;
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
        verifier = BlobVerifier(expected_id=model_id)
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
            try:
                verifier.feed(chunk)
            except ModelBlobError as exc:
                exc.fields.update(url=url, size=received)
                raise
            buffer.write(chunk)
        if expected is not None and received != expected:
            raise _RetryableError(
                FetchTruncatedError(
                    url=url, model_id=model_id, expected_bytes=expected, received_bytes=received
                )
            )
    try:
        verifier.finish()
    except ModelBlobError as exc:
        exc.fields.update(url=url, size=received)
        raise
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
    cls = REMOTE_ERRORS.get(code) if isinstance(code, str) else None
    if cls is None:
        return FetchRefusedError(
            f"{url} answered HTTP {status}: {message or response.reason}",
            remote_code=code,
            **fields,
        )
    return cls(f"{url}: {message}" if isinstance(message, str) else None, **fields)
