"""Fetching a model blob from a node's data plane over pinned TLS, checked against its ID."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http import HTTPStatus
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

import cachetools
import urllib3
from eth_account.signers.local import LocalAccount

from core.errors import FlexError
from dataplane.protocol import (
    CHUNKS_SEGMENT,
    DEFAULT_MAX_BYTES,
    MAX_OPENED_MODELS,
    MAX_OPENINGS,
    MODELS_PATH,
    OPENINGS_TYPE,
    REMOTE_ERRORS,
    FetchDeadlineError,
    FetchFailedError,
    FetchRefusedError,
    FetchTruncatedError,
    ModelTooLargeError,
    OpeningMalformedError,
    PeerCertificateError,
)
from dataplane.signing import sign_request
from dataplane.tls import pin_check, pinned_pool
from training.errors import ModelBlobError
from training.serialize import ChunkOpening, Openings, id_hex, parse_id
from training.verifier import BlobVerifier

log = logging.getLogger(__name__)

_CHUNK_BYTES = 256 * 1024
# An opening: a chunk of at most 65,536 values, its share of a header and of a proof of at
# most 64 hashes a chunk.
_MAX_OPENING_BYTES = 1 << 19


def opening_bytes(chunk_values: int) -> int:
    """The most a chunk of ``chunk_values`` values takes in an answer: its values, at most 64
    hashes of proof, and a header of up to 32 KiB."""
    return min(_MAX_OPENING_BYTES, 4 * chunk_values + 64 * 32 + (32 << 10) + 8)


# Peers a thread keeps a connection to: more than a round's trainers (the contract takes
# at most 128), so that an aggregator keeps every connection of its round.
KEPT_PEERS = 256
R = TypeVar("R")
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_kept = threading.local()


def kept_pool(base_url: str, *, sha256: str) -> urllib3.HTTPSConnectionPool:
    """This thread's connection to the node at ``base_url``, pinned to ``sha256``
    (tls.pinned_pool) and kept from one request to the next: a node that fetches from the
    same peer round after round keeps its TLS connection instead of making a new handshake
    on both sides each time. Pinned to another certificate, the connection made to the old
    one is closed. One per thread, so that a thread always finds its connection free, and
    one per process: a forked child never writes to a connection its parent holds.

    A thread keeps its KEPT_PEERS most recent peers; the connection to the one used longest
    ago is closed when another is added, so a node that meets thousands of peers over its
    life does not hold a socket open to each.

    urllib3 itself rather than requests over it: a request costs the client about half the
    CPU (chain.node.NodeProvider does the same for the node)."""
    if getattr(_kept, "pid", None) != os.getpid():
        _kept.pools, _kept.pid = _Pools(maxsize=KEPT_PEERS), os.getpid()
    pools: _Pools = _kept.pools
    fingerprint = pin_check(sha256)
    pool = pools.get(base_url)
    if pool is not None and pool.assert_fingerprint != fingerprint:
        pool.close()
        pool = None
    if pool is None:
        pools[base_url] = pool = pinned_pool(base_url, sha256=fingerprint)
    return pool


class _Pools(cachetools.LRUCache):
    """A thread's connections by peer, the one used longest ago closed to make room."""

    def popitem(self) -> tuple[str, urllib3.HTTPSConnectionPool]:
        url, pool = super().popitem()
        pool.close()
        return url, pool


def fetch_model(**kwargs: Any) -> bytes:
    """Fetch a model blob into memory and check it against its ID: ``fetch_model_to``'s
    arguments but ``sink``. For nodes, which keep what they fetch in their store anyway."""
    buffer = io.BytesIO()
    fetch_model_to(sink=buffer, **kwargs)
    return buffer.getvalue()


def fetch_model_to(
    *,
    sink: BinaryIO,
    base_url: str,
    cert_sha256: str,
    model_id: bytes | str,
    server_address: str,
    account: LocalAccount,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = 30.0,
    deadline_s: float | None = None,
    retries: int = 3,
    backoff: float = 0.5,
) -> int:
    """Fetch a model blob from the data plane at ``base_url`` into ``sink`` (a file, written
    from its start) and check it against its ID; returns its size.

    The connection is TLS to exactly the certificate ``cert_sha256`` (the fingerprint the node
    registered); any other is refused before the request is sent (PeerCertificateError, not
    retried). ``server_address`` is the serving node's Ethereum address: the request is signed
    for it, for the URL's host and once. Connection errors, truncated bodies and 5xx/429
    answers are retried ``retries`` times with exponential back-off; the peer's refusals are
    raised at once as the server's own error class (AuthError subclasses, AccessDeniedError,
    BlobNotFoundError, ...). ``timeout`` bounds each wait on the socket, ``deadline_s`` the
    whole fetch, retries included (FetchDeadlineError).
    Raises ModelTooLargeError (over ``max_bytes``), FetchTruncatedError (fewer bytes than
    Content-Length), a ModelBlobError subclass as soon as the streamed bytes show they are
    not the model: ModelIdMismatchError (header and leaves name another ID; both IDs in the
    error, raised before any value is read), ChunkMismatchError (a chunk does not match its
    leaf), BlobHeaderError, BlobTooLongError;
    FetchFailedError (unreachable after all retries), FetchRefusedError (unknown refusals).
    """
    wanted = id_hex(parse_id(model_id))
    _require_https(base_url)
    path = MODELS_PATH + wanted
    url = base_url.rstrip("/") + path
    deadline = None if deadline_s is None else time.monotonic() + deadline_s

    def once(pool: urllib3.HTTPSConnectionPool) -> int:
        sink.seek(0)
        sink.truncate()
        return _fetch_once(
            pool=pool,
            path=path,
            url=url,
            sink=sink,
            model_id=wanted,
            server_address=server_address,
            account=account,
            max_bytes=max_bytes,
            timeout=timeout,
            deadline=deadline,
            deadline_s=deadline_s,
        )

    started = time.monotonic()
    size = _retrying(
        once,
        base_url=base_url,
        cert_sha256=cert_sha256,
        url=url,
        model_id=wanted,
        retries=retries,
        backoff=backoff,
        deadline=deadline,
        deadline_s=deadline_s,
    )
    log.info(
        "fetched model %s (%d bytes) from %s in %.2fs",
        wanted,
        size,
        url,
        time.monotonic() - started,
    )
    return size


def fetch_openings(
    *,
    base_url: str,
    cert_sha256: str,
    model_ids: Sequence[bytes | str],
    indexes: Sequence[int],
    server_address: str,
    account: LocalAccount,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 0.5,
    opening_bytes: int = _MAX_OPENING_BYTES,
) -> list[list[ChunkOpening]]:
    """Chunks ``indexes`` (1 to MAX_OPENINGS of them) of each of ``model_ids`` (1 to
    MAX_OPENED_MODELS), in one request, from the data plane at ``base_url``: for each model in
    that order, its chunks in the order asked, each with the model's header and root and its
    Merkle path. They come in binary, a model's chunks with one proof for them all
    (training.serialize.Openings), and are checked against their model's ID before they are
    returned: a peer cannot hand over a chunk of any other model or a changed one
    (ModelIdMismatchError, ChunkMismatchError). Signed, pinned and retried as
    ``fetch_model_to``; a body that is not the openings asked for (or longer than
    ``opening_bytes`` a chunk) is OpeningMalformedError, a chunk past a model's last
    ChunkIndexError."""
    wanted = [id_hex(parse_id(m)) for m in model_ids]
    asked = [int(i) for i in indexes]
    if not 1 <= len(asked) <= MAX_OPENINGS:
        raise ValueError(f"ask for 1 to {MAX_OPENINGS} chunks at once, not {len(asked)}")
    if not 1 <= len(wanted) <= MAX_OPENED_MODELS:
        raise ValueError(f"ask for 1 to {MAX_OPENED_MODELS} models at once, not {len(wanted)}")
    _require_https(base_url)
    listed = ",".join(map(str, asked))
    path = f"{MODELS_PATH}{','.join(wanted)}{CHUNKS_SEGMENT}{listed}"
    url = base_url.rstrip("/") + path
    limit = min(opening_bytes, _MAX_OPENING_BYTES) * len(asked) * len(wanted)
    shown = wanted[0] if len(wanted) == 1 else f"{wanted[0]} and {len(wanted) - 1} more"

    def once(pool: urllib3.HTTPSConnectionPool) -> bytes:
        headers = sign_request(
            account=account, method="GET", url=url, server_address=server_address
        )
        with _get(pool, path, headers=headers, timeout=timeout) as response:
            if response.status != HTTPStatus.OK:
                error = _remote_error(response, url=url, model_id=shown)
                if response.status in _RETRY_STATUSES:
                    raise _RetryableError(error)
                raise error
            if (kind := response.headers.get("Content-Type")) != OPENINGS_TYPE:
                raise OpeningMalformedError(
                    url=url,
                    model_id=shown,
                    reason=f"{kind} where {OPENINGS_TYPE} was expected (an older FLEX?)",
                )
            return response.read(limit + 1)

    body = _retrying(
        once,
        base_url=base_url,
        cert_sha256=cert_sha256,
        url=url,
        model_id=shown,
        retries=retries,
        backoff=backoff,
    )
    try:
        if len(body) > limit:
            raise ValueError(f"more than {limit} bytes")
        offset, packed = 0, []
        for _ in wanted:
            one, offset = Openings.unpack(body, offset, asked)
            packed.append(one)
        if offset != len(body):
            raise ValueError(f"{len(body) - offset} bytes after the last model's openings")
    except ValueError as exc:
        raise OpeningMalformedError(url=url, model_id=shown, reason=str(exc)[:200]) from None
    return [one.check(model_id) for model_id, one in zip(wanted, packed, strict=True)]


def _require_https(base_url: str) -> None:
    if urlsplit(base_url).scheme != "https":
        raise FetchRefusedError(
            f"{base_url} is not an https URL: the data plane speaks TLS only", url=base_url
        )


@contextlib.contextmanager
def _get(
    pool: urllib3.HTTPSConnectionPool, path: str, *, headers: dict[str, str], timeout: float
) -> Iterator[urllib3.BaseHTTPResponse]:
    """A GET of ``path`` whose body is read as it arrives. Read to its end, the connection
    goes back to the pool for the next request; left before, it is closed (what is left of
    the body would be taken for the next answer)."""
    response = pool.urlopen(
        "GET",
        path,
        headers=headers,
        timeout=timeout,
        preload_content=False,
        # Content-Length is checked by the caller, who says how much did arrive.
        enforce_content_length=False,
    )
    try:
        yield response
    finally:
        if not response.closed:
            response.close()
        response.release_conn()


def _retrying(
    attempt_once: Callable[[urllib3.HTTPSConnectionPool], R],
    *,
    base_url: str,
    cert_sha256: str,
    url: str,
    model_id: str,
    retries: int,
    backoff: float,
    deadline: float | None = None,
    deadline_s: float | None = None,
) -> R:
    """``attempt_once`` over this thread's connection to ``base_url`` pinned to
    ``cert_sha256`` (kept_pool), again on connection errors, truncations and 5xx/429
    answers, with exponential back-off, ``retries`` times or until ``deadline``; the peer's
    refusals and a wrong certificate are raised at once."""
    pool = kept_pool(base_url, sha256=cert_sha256)
    attempts = retries + 1
    for attempt in range(1, attempts + 1):
        try:
            return attempt_once(pool)
        except (urllib3.exceptions.HTTPError, OSError, _RetryableError) as exc:
            if _wrong_certificate(exc):
                raise PeerCertificateError(
                    url=base_url, expected=cert_sha256, reason=str(exc)[:300]
                ) from exc
            error: Exception = exc.error if isinstance(exc, _RetryableError) else exc
        delay = backoff * 2 ** (attempt - 1)
        out_of_time = deadline is not None and time.monotonic() + delay >= deadline
        if attempt == attempts or out_of_time:
            if isinstance(error, FlexError):
                raise error from None
            if out_of_time:
                raise FetchDeadlineError(
                    url=url, model_id=model_id, deadline_s=deadline_s, reason=repr(error)
                ) from error
            raise FetchFailedError(
                url=url, model_id=model_id, attempts=attempt, reason=repr(error)
            ) from error
        log.warning(
            "fetch of model %s from %s failed (%s); retry %d of %d in %.2fs",
            model_id,
            url,
            getattr(error, "message", None) or repr(error),
            attempt,
            retries,
            delay,
        )
        time.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


def _wrong_certificate(exc: Exception) -> bool:
    """Whether ``exc`` is urllib3's refusal of a certificate other than the pinned one."""
    return isinstance(exc, urllib3.exceptions.HTTPError) and "fingerprints did not match" in (
        str(exc).lower()
    )


class _RetryableError(Exception):
    """Carries a FLEX error that is worth another attempt (truncation, 5xx)."""

    def __init__(self, error: FlexError) -> None:
        super().__init__(error.message)
        self.error = error


def _fetch_once(
    *,
    pool: urllib3.HTTPSConnectionPool,
    path: str,
    url: str,
    sink: BinaryIO,
    model_id: str,
    server_address: str,
    account: LocalAccount,
    max_bytes: int,
    timeout: float,
    deadline: float | None,
    deadline_s: float | None,
) -> int:
    def left() -> float:
        return timeout if deadline is None else min(timeout, deadline - time.monotonic())

    if left() <= 0:
        raise FetchDeadlineError(url=url, model_id=model_id, deadline_s=deadline_s)
    headers = sign_request(account=account, method="GET", url=url, server_address=server_address)
    # Content-Length must count the blob's own bytes: no transfer encoding of the body.
    headers["Accept-Encoding"] = "identity"
    with _get(pool, path, headers=headers, timeout=left()) as response:
        if response.status != HTTPStatus.OK:
            error = _remote_error(response, url=url, model_id=model_id)
            if response.status in _RETRY_STATUSES:
                raise _RetryableError(error)
            raise error
        announced = response.headers.get("Content-Length", "")
        expected = int(announced) if announced.isdigit() else None
        if expected is not None and expected > max_bytes:
            raise ModelTooLargeError(model_id=model_id, size=expected, limit=max_bytes, url=url)
        verifier = BlobVerifier(expected_id=model_id)
        received = 0
        while True:
            # read1 returns what one read of the socket brought, so the deadline is checked
            # after every read however slowly a peer sends.
            chunk = response.read1(_CHUNK_BYTES)
            if not chunk:
                break
            received += len(chunk)
            if received > max_bytes:
                raise ModelTooLargeError(
                    f"model {model_id} from {url} exceeds the limit of {max_bytes} bytes",
                    model_id=model_id,
                    size=received,
                    limit=max_bytes,
                    url=url,
                )
            if deadline is not None and time.monotonic() > deadline:
                raise FetchDeadlineError(
                    url=url, model_id=model_id, deadline_s=deadline_s, received_bytes=received
                )
            try:
                verifier.feed(chunk)
            except ModelBlobError as exc:
                exc.fields.update(url=url, size=received)
                raise
            sink.write(chunk)
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
    sink.flush()
    return received


def _remote_error(response: urllib3.BaseHTTPResponse, *, url: str, model_id: str) -> FlexError:
    """The peer's JSON error as the matching FLEX error class, or FetchRefusedError."""
    status = response.status
    try:
        # A peer's error body is small; read a bounded prefix rather than trust its length.
        body = json.loads(response.read(64 * 1024) or b"null")
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


def health_check(*, base_url: str, cert_sha256: str, timeout: float = 10.0) -> str | None:
    """None when the data plane at ``base_url`` answers ``/health`` over TLS with the pinned
    certificate, else why not, in a sentence (a report for people: never raises)."""
    url = base_url.rstrip("/") + "/health"
    try:
        pool = pinned_pool(base_url, sha256=cert_sha256)
    except (ValueError, FlexError) as exc:
        return f"{base_url} cannot be reached: {getattr(exc, 'message', None) or exc}"
    try:
        with pool:
            response = pool.urlopen("GET", urlsplit(url).path, timeout=timeout)
    except urllib3.exceptions.HTTPError as exc:
        if _wrong_certificate(exc):
            return f"{base_url} shows another TLS certificate than the one registered"
        if isinstance(exc, urllib3.exceptions.SSLError):
            return f"TLS to {base_url} failed: {str(exc)[:200]}"
        if isinstance(exc, urllib3.exceptions.TimeoutError) and not isinstance(
            exc,
            urllib3.exceptions.NewConnectionError,  # a refusal, which urllib3 files there
        ):
            return f"{base_url} did not answer within {timeout:g} s"
        return f"{base_url} cannot be reached: {str(exc)[:200]}"
    except OSError as exc:
        return f"{base_url} cannot be reached: {str(exc)[:200]}"
    if response.status != HTTPStatus.OK:
        return f"{url} answered HTTP {response.status}"
    return None
