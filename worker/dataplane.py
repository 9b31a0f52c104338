"""The data plane: each node's HTTP server for its model blobs, and the client that fetches them."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlsplit

import requests
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak
from eth_utils import is_hex_address, to_checksum_address

from chain.client import FlexMarket, TaskState
from chain.errors import FlexError, UnknownTaskError
from training.errors import BlobNotFoundError, ModelIdMismatchError
from training.serialize import id_hex, parse_id
from training.store import ModelStore, StoredModel
from worker.signing import (
    DEFAULT_WINDOW_SECONDS,
    AuthError,
    DataPlaneError,
    SignatureExpiredError,
    SignatureMalformedError,
    SignatureMismatchError,
    SignatureMissingError,
    sign_request,
    verify_request,
)

log = logging.getLogger(__name__)

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


class Policy(Protocol):
    """Who may fetch which blob from this node."""

    def authorize_fetch(self, *, requester: str, meta: StoredModel) -> None:
        """Return if ``requester`` (checksummed) may fetch the blob; raise AccessDeniedError."""
        ...


class AllowListPolicy:
    """A fixed set of addresses may fetch every blob: for tests and single-owner setups."""

    def __init__(self, *, addresses: Iterable[str]) -> None:
        self.addresses = frozenset(to_checksum_address(a) for a in addresses)

    def authorize_fetch(self, *, requester: str, meta: StoredModel) -> None:
        if to_checksum_address(requester) not in self.addresses:
            raise AccessDeniedError(
                requester=requester, model_id=id_hex(meta.model_id), reason="not on the allow list"
            )


@dataclass(frozen=True)
class _Parties:
    """Who a task involves, as read from the chain; ``aggregator`` None before selection."""

    buyer: str
    state: TaskState
    aggregator: str | None
    trainers: frozenset[str]


class ChainPolicy:
    """FlexMarket's access rules for model blobs, read from the chain.

    A device's UPDATE goes only to its task's selected aggregator; a task's GLOBAL models go
    to its buyer, its aggregator and its selected trainers. A selected device must also still
    be active in the device registry. Chain answers are reused for ``ttl`` seconds, so a
    revoked device loses access at most ``ttl`` seconds after its revocation is mined (and a
    newly selected one gains it as late). An unreadable chain raises ChainUnavailableError:
    the server then answers 503 and refuses the blob (fail closed).
    """

    def __init__(
        self,
        *,
        market: FlexMarket,
        ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.market = market
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        # Bounded by what is asked: tasks of blobs in this store, and selected devices only.
        self._tasks: dict[int, tuple[float, _Parties | None]] = {}
        self._devices: dict[str, tuple[float, bool]] = {}

    def authorize_fetch(self, *, requester: str, meta: StoredModel) -> None:
        requester = to_checksum_address(requester)
        task_id = meta.task_id

        def deny(reason: str) -> AccessDeniedError:
            return AccessDeniedError(
                requester=requester,
                model_id=id_hex(meta.model_id),
                reason=reason,
                task_id=task_id,
                kind=meta.kind,
            )

        if task_id is None or meta.kind not in ("global", "update"):
            raise deny("the blob is not indexed as a task's global model or update")
        parties = self._parties(task_id)
        if parties is None:
            raise deny(f"task {task_id} does not exist on chain")
        if parties.aggregator is None:
            raise deny(f"task {task_id} has no selected nodes ({parties.state.name.lower()})")
        if meta.kind == "update":
            if requester != parties.aggregator:
                raise deny(
                    f"only task {task_id}'s aggregator {parties.aggregator} may fetch its updates"
                )
        elif requester == parties.buyer:
            return
        elif requester != parties.aggregator and requester not in parties.trainers:
            raise deny(
                f"only task {task_id}'s buyer, aggregator and selected trainers may fetch "
                "its global models"
            )
        if not self._active(requester):
            raise deny(f"device {requester} is revoked in the device registry")

    def _parties(self, task_id: int) -> _Parties | None:
        cached = self._cached(self._tasks, task_id)
        if cached is not _MISS:
            return cached
        try:
            task = self.market.task(task_id=task_id)
        except UnknownTaskError:
            parties = None
        else:
            selection = self.market.selection(task_id=task_id)
            parties = _Parties(
                buyer=to_checksum_address(task.buyer),
                state=task.state,
                aggregator=to_checksum_address(selection.aggregator) if selection else None,
                trainers=frozenset(selection.trainers) if selection else frozenset(),
            )
        return self._store(self._tasks, task_id, parties)

    def _active(self, device: str) -> bool:
        cached = self._cached(self._devices, device)
        if cached is not _MISS:
            return cached
        return self._store(self._devices, device, self.market.device(device=device).active)

    def _cached(self, cache: dict[Any, tuple[float, Any]], key: Any) -> Any:
        with self._lock:
            entry = cache.get(key)
        if entry is None or entry[0] <= self.clock():
            return _MISS
        return entry[1]

    def _store(self, cache: dict[Any, tuple[float, Any]], key: Any, value: Any) -> Any:
        with self._lock:
            cache[key] = (self.clock() + self.ttl, value)
        return value


_MISS = object()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    plane: DataPlaneServer


class _Handler(BaseHTTPRequestHandler):
    """One connection; GET /health and GET /models/<id>, errors as FLEX's JSON error shape."""

    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "FlexDataPlane/1"
    error_content_type = "application/json"

    def setup(self) -> None:
        # A socket timeout bounds how long an idle or stalled peer can hold a server thread.
        self.timeout = self.server.plane.io_timeout
        super().setup()

    def do_GET(self) -> None:
        self._body_started = False
        try:
            path = self.path.split("?", 1)[0]
            if path == "/health":
                self._send_json(HTTPStatus.OK, self.server.plane.health())
            elif path.startswith(MODELS_PATH):
                self._get_model(path.removeprefix(MODELS_PATH))
            else:
                raise RouteNotFoundError(path=path[:200])
        except (DataPlaneError, BlobNotFoundError) as exc:
            status = getattr(exc, "status", HTTPStatus.NOT_FOUND)
            log_level = logging.INFO if status == HTTPStatus.NOT_FOUND else logging.WARNING
            log.log(log_level, "refused %s from %s: %s", path, self._peer(), exc.message)
            self._send_json(status, exc.as_dict())
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as exc:
            # The peer went away or stalled mid-transfer; it will retry, nothing to answer.
            log.warning("transfer of %s to %s aborted: %r", path, self._peer(), exc)
            self.close_connection = True
        except Exception:
            log.exception("data plane failed on GET %s from %s", path, self._peer())
            if self._body_started:
                self.close_connection = True
            else:
                self._send_json(
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                    {"code": "internal_error", "message": "internal server error", "fields": {}},
                )

    def _get_model(self, raw_id: str) -> None:
        plane = self.server.plane
        started = time.monotonic()
        # Authenticate before anything else so that unsigned callers learn nothing.
        requester = verify_request(
            headers=self.headers,
            method="GET",
            path=self.path,
            server_address=plane.node_address,
            window=plane.auth_window,
        )
        try:
            model_id = parse_id(raw_id)
        except FlexError:
            raise ModelIdMalformedError(value=raw_id[:80]) from None
        shown = id_hex(model_id)
        meta = plane.store.info(model_id)
        try:
            plane.policy.authorize_fetch(requester=requester, meta=meta)
        except DataPlaneError:
            raise
        except Exception as exc:
            # Fail closed: when the policy cannot decide (chain down), nobody gets the blob,
            # and the 503 tells the requester to come back.
            if isinstance(exc, FlexError):  # expected kind of failure: no traceback spam
                log.warning("access policy for %s on %s failed: %s", requester, shown, exc)
            else:
                log.exception("access policy failed for %s on %s", requester, shown)
            raise PolicyUnavailableError(
                f"cannot check access to model {shown} right now: {type(exc).__name__}",
                model_id=shown,
            ) from exc
        if meta.size > plane.max_bytes:
            raise ModelTooLargeError(model_id=shown, size=meta.size, limit=plane.max_bytes)
        # No re-hash before serving: every requester checks the bytes against the on-chain ID
        # anyway, and hashing 100 MB per request would cost an edge device more than sending.
        with plane.store.open(model_id, verify=False) as blob:
            size = _file_size(blob, default=meta.size)
            if size > plane.max_bytes:
                raise ModelTooLargeError(model_id=shown, size=size, limit=plane.max_bytes)
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.send_header("ETag", f'"{shown}"')
            self.end_headers()
            self._body_started = True
            # sendfile() moves the bytes kernel-side where the file allows it, and falls back
            # to a bounded read/send loop otherwise: a blob is never held whole in memory.
            sent = self.connection.sendfile(blob, 0, size)
        if sent != size:
            # Content-Length promised more than the file now holds; the peer sees truncation.
            log.error("model %s shrank while serving: sent %d of %d bytes", shown, sent, size)
            self.close_connection = True
            return
        log.info(
            "served model %s (%d bytes, task %s round %s, %s) to %s in %.2fs",
            shown,
            size,
            meta.task_id,
            meta.round_number,
            meta.kind,
            requester,
            time.monotonic() - started,
        )

    def _send_json(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (bad request line, unsupported method) in FLEX's JSON shape.
        self.close_connection = True
        try:
            reason = message or HTTPStatus(code).phrase
        except ValueError:
            reason = f"HTTP {code}"
        self._send_json(code, {"code": f"http_{int(code)}", "message": reason, "fields": {}})

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self._peer(), format % args)

    def _peer(self) -> str:
        return "%s:%s" % self.client_address[:2]  # noqa: UP031


def _file_size(blob: BinaryIO, *, default: int) -> int:
    """The size of the open blob file itself, which is what sendfile will send."""
    try:
        return os.fstat(blob.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        return default


class DataPlaneServer:
    """The node's data-plane HTTP server, run in a background thread of the worker process.

    ``node_address`` is the node's own Ethereum address: requests must be signed for it, so
    a request captured by (or sent to) another node cannot be replayed here.
    """

    def __init__(
        self,
        *,
        store: ModelStore,
        policy: Policy,
        node_address: str,
        host: str = "127.0.0.1",
        port: int = 0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        auth_window: int = DEFAULT_WINDOW_SECONDS,
        io_timeout: float = 60.0,
    ) -> None:
        if not is_hex_address(node_address):
            raise ValueError(f"node_address must be an Ethereum address, not {node_address!r}")
        self.store = store
        self.policy = policy
        self.node_address = to_checksum_address(node_address)
        self.host = host
        self.port = port
        self.max_bytes = max_bytes
        self.auth_window = auth_window
        self.io_timeout = io_timeout
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL peers fetch from, e.g. ``http://127.0.0.1:41234``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "address": self.node_address, "max_bytes": self.max_bytes}

    def start(self) -> DataPlaneServer:
        """Bind (port 0 picks a free port, then ``.port`` is set) and serve in a thread."""
        if self._httpd is not None:
            raise RuntimeError("data-plane server already started")
        httpd = _HTTPServer((self.host, self.port), _Handler)
        httpd.plane = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            # How often the loop looks for stop(): the longest stop() waits, near-free when idle.
            kwargs={"poll_interval": 0.1},
            name=f"flex-dataplane-{self.port}",
            daemon=True,
        )
        self._thread.start()
        log.info("data plane of %s listening on %s", self.node_address, self.url)
        return self

    def stop(self) -> None:
        """Stop accepting requests and close the socket; transfers in flight finish alone."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = self._thread = None
        log.info("data plane of %s on port %d stopped", self.node_address, self.port)

    def __enter__(self) -> DataPlaneServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


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
