"""Each node's data-plane server for its model blobs: HTTPS with the node's own certificate."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import selectors
import socket
import ssl
import sys
import threading
import time
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO

from eth_utils import is_hex_address, to_checksum_address

from core.errors import FlexError
from dataplane.access import Policy
from dataplane.addresses import authority
from dataplane.protocol import (
    CHUNKS_SEGMENT,
    DEFAULT_MAX_BYTES,
    DEFAULT_WINDOW_SECONDS,
    MAX_OPENED_MODELS,
    MAX_OPENINGS,
    MODELS_PATH,
    OPENINGS_TYPE,
    ChunkIndexError,
    DataPlaneError,
    ModelIdMalformedError,
    ModelListError,
    ModelTooLargeError,
    PolicyUnavailableError,
    RouteNotFoundError,
)
from dataplane.signing import MemoryNonces, verify_request
from dataplane.tls import NodeCertificate
from training.errors import BlobNotFoundError
from training.serialize import id_hex, parse_id
from training.store import ChunkOutOfRangeError, ModelStore

log = logging.getLogger(__name__)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    plane: DataPlaneServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A peer gone between select and accept must not leave accept() waiting for the next.
        self.socket.setblocking(False)
        self._stopping = threading.Event()
        # What stop_serving writes to: the loop's one reason to wake besides a peer.
        self._wake_read, self._wake_write = socket.socketpair()

    def serve(self) -> None:
        """Accept connections until stop_serving(), asleep while no peer connects.

        socketserver's serve_forever wakes every poll interval to look for its shutdown: near
        nothing for one node, but a process serving hundreds of simulated nodes runs as many
        loops, and at ten looks a second each they took a twentieth of a core doing nothing.
        """
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self and not self._stopping.is_set():
                        self._handle_request_noblock()
                self.service_actions()

    def stop_serving(self) -> None:
        """Make serve() return (at once, even while it sleeps); the caller joins its thread."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_write.send(b"\0")

    def server_close(self) -> None:
        super().server_close()
        self._wake_read.close()
        self._wake_write.close()

    def get_request(self) -> tuple[socket.socket, Any]:
        # The TLS handshake runs in the connection's own thread (_Handler.setup), under its
        # timeout: a peer that stalls mid-handshake holds one thread, never the accept loop.
        sock, addr = self.socket.accept()
        wrapped = self.plane.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        self.plane.connections.add(wrapped)
        return wrapped, addr

    def shutdown_request(self, request: Any) -> None:
        self.plane.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A failed handshake (plain HTTP, a scanner, a client that pins another certificate)
        # or a dropped connection is the peer's business: one line, not a traceback.
        error = sys.exc_info()[1]
        if isinstance(error, ssl.SSLError | OSError):
            log.info("connection from %s:%s ended: %r", *client_address[:2], error)
        else:
            log.exception("data plane failed on a connection from %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    """One connection; GET /health and GET /models/<id>, errors as FLEX's JSON error shape."""

    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "FlexDataPlane/1"
    error_content_type = "application/json"
    # A response's headers and body leave in separate writes: with Nagle's algorithm the body
    # would wait for the peer's delayed ACK of the headers (~40 ms per chunk a watcher opens).
    disable_nagle_algorithm = True

    def setup(self) -> None:
        # A socket timeout bounds how long an idle or stalled peer can hold a server thread.
        self.timeout = self.server.plane.io_timeout
        self.request.settimeout(self.timeout)
        self.request.do_handshake()
        super().setup()

    def do_GET(self) -> None:
        if not self.server.plane.serving:
            # Stopped: a request that came over a connection kept open is not answered.
            self.close_connection = True
            return
        self._body_started = False
        try:
            path = self.path.split("?", 1)[0]
            if path == "/health":
                self._send_json(HTTPStatus.OK, self.server.plane.health())
            elif path.startswith(MODELS_PATH) and CHUNKS_SEGMENT in path:
                raw_id, _, index = path.removeprefix(MODELS_PATH).partition(CHUNKS_SEGMENT)
                self._get_opening(raw_id, index)
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

    def _get_opening(self, raw_ids: str, raw_indexes: str) -> None:
        plane = self.server.plane
        requester = self._requester()
        listed = raw_ids.split(",")
        if not 1 <= len(listed) <= MAX_OPENED_MODELS:
            raise ModelListError(count=str(len(listed)))
        # Every model is checked before any is read: one the requester may not open refuses
        # the whole request, naming it.
        models = [
            self._allowed(raw, requester, plane.policy.authorize_opening)[0] for raw in listed
        ]
        indexes = raw_indexes.split(",")
        if not 1 <= len(indexes) <= MAX_OPENINGS or not all(
            i.isdigit() and len(i) <= 12 for i in indexes
        ):
            raise ChunkIndexError(model_id=id_hex(models[0]), index=raw_indexes[:40])
        asked = [int(i) for i in indexes]
        parts = []
        for model_id in models:
            try:
                parts.append(plane.store.opened(model_id, asked).pack())
            except ChunkOutOfRangeError as exc:
                raise ChunkIndexError(model_id=id_hex(model_id), index=str(exc.index)) from None
        body = b"".join(parts)
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", OPENINGS_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        log.info(
            "served chunks %s of %s to %s",
            raw_indexes,
            id_hex(models[0]) if len(models) == 1 else f"{len(models)} models",
            requester,
        )

    def _requester(self) -> str:
        """The signed requester; raises the AuthError to answer with otherwise."""
        plane = self.server.plane
        # Authenticate before anything else so that unsigned callers learn nothing.
        return verify_request(
            headers=self.headers,
            method="GET",
            path=self.path,
            authority=plane.authority,
            server_address=plane.node_address,
            nonces=plane.nonces,
            window=plane.auth_window,
        )

    def _allowed(self, raw_id: str, requester: str, authorize: Any) -> tuple[bytes, Any]:
        """The ID of model ``raw_id`` and its index entry, once ``authorize`` lets
        ``requester`` have it; raises the DataPlaneError to answer with otherwise."""
        plane = self.server.plane
        try:
            model_id = parse_id(raw_id)
        except FlexError:
            raise ModelIdMalformedError(value=raw_id[:80]) from None
        shown = id_hex(model_id)
        meta = plane.store.info(model_id)
        try:
            authorize(requester=requester, meta=meta)
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
        return model_id, meta

    def _get_model(self, raw_id: str) -> None:
        plane = self.server.plane
        started = time.monotonic()
        requester = self._requester()
        model_id, meta = self._allowed(raw_id, requester, plane.policy.authorize_fetch)
        shown = id_hex(model_id)
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
    """The node's data-plane HTTPS server, run in a background thread of the worker process.

    ``node_address`` is the node's own Ethereum address and ``public_url`` the URL it is
    advertised at (by default its own bind address): requests must be signed for both, and
    each once, so a request captured by (or sent to) another node or host cannot be replayed
    here. ``certificate`` is the node's own, whose fingerprint its peers pin.
    """

    def __init__(
        self,
        *,
        store: ModelStore,
        policy: Policy,
        node_address: str,
        certificate: NodeCertificate,
        public_url: str | None = None,
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
        self.certificate = certificate
        self.tls = certificate.server_context()
        self.public_url = public_url
        self.nonces = MemoryNonces()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Open connections: a peer keeps its connection between requests (HTTP/1.1).
        self.connections: set[socket.socket] = set()
        self.serving = False

    @property
    def url(self) -> str:
        """The base URL peers fetch from: the public URL, else e.g. ``https://127.0.0.1:41234``."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    @property
    def authority(self) -> str:
        """The ``host:port`` signed requests must name: this server's, as peers address it."""
        return authority(self.url)

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
            target=httpd.serve, name=f"flex-dataplane-{self.port}", daemon=True
        )
        self.serving = True
        self._thread.start()
        log.info(
            "data plane of %s listening on %s:%d (TLS, certificate %s), advertised as %s",
            self.node_address,
            self.host,
            self.port,
            self.certificate.sha256,
            self.url,
        )
        return self

    def stop(self) -> None:
        """Stop accepting connections and requests: the listening socket closes, and so does
        each open connection once its transfer in flight (if any) has finished."""
        if self._httpd is None:
            return
        self.serving = False
        self._httpd.stop_serving()
        if self._thread is not None:
            self._thread.join()
        self._httpd.server_close()
        for connection in set(self.connections):
            # Only the reading half of the plain socket (SSLSocket.shutdown would end TLS under
            # a response being sent): the connection's thread reads no further request.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(connection, socket.SHUT_RD)
        self._httpd = self._thread = None
        log.info("data plane of %s on port %d stopped", self.node_address, self.port)

    def __enter__(self) -> DataPlaneServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
