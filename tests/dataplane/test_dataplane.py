"""The data plane over real TLS sockets: signed fetches, refusals, size caps, verification,
retries."""

from __future__ import annotations

import multiprocessing
import pickle
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import urllib3
from eth_account import Account
from eth_account.signers.local import LocalAccount

import dataplane.client
from chain.launcher import free_port
from core.proxies import ProxyUrlError
from dataplane.access import AllowListPolicy
from dataplane.client import fetch_model, health_check, kept_pool
from dataplane.protocol import (
    HEADER_ADDRESS,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    AccessDeniedError,
    FetchFailedError,
    FetchTruncatedError,
    ModelTooLargeError,
    PeerCertificateError,
    PolicyUnavailableError,
    SignatureMismatchError,
)
from dataplane.server import DataPlaneServer
from dataplane.signing import MemoryNonces, sign_request, verify_request
from tests.blobs import blob_of
from tests.dataplane.conftest import cert_for, pinned
from tests.proxies import forward_proxy, no_proxy_environment
from training.errors import BlobNotFoundError, ChunkMismatchError, ModelIdMismatchError
from training.serialize import Kind, Openings, id_hex, model_id, read_header
from training.store import ModelStore, StoredModel

SERVER = Account.from_key(b"\x01" * 32)
REQUESTER = Account.from_key(b"\x02" * 32)
STRANGER = Account.from_key(b"\x03" * 32)
FAST = {"retries": 2, "backoff": 0.01, "timeout": 5.0}


@pytest.fixture
def server(store: ModelStore) -> Iterator[DataPlaneServer]:
    policy = AllowListPolicy(addresses=[REQUESTER.address])
    with DataPlaneServer(
        certificate=cert_for("server"), store=store, policy=policy, node_address=SERVER.address
    ) as plane:
        yield plane


@pytest.fixture
def blob() -> bytes:
    rng = np.random.default_rng(7)
    return blob_of([rng.standard_normal((64, 32)).astype(np.float32), np.arange(10.0)])


@pytest.fixture
def stored(store: ModelStore, blob: bytes) -> str:
    return id_hex(store.put(blob))


def _fetch(
    plane: DataPlaneServer | _RogueServer, mid: str, account: LocalAccount = REQUESTER, **kw
) -> bytes:
    return fetch_model(
        base_url=plane.url,
        cert_sha256=kw.pop("cert_sha256", plane.certificate.sha256),
        model_id=mid,
        server_address=kw.pop("server_address", plane.node_address),
        account=account,
        **{**FAST, **kw},
    )


def _get(plane: DataPlaneServer, path: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
    return pinned(plane).request("GET", path, headers=headers, timeout=5)


def _signed(plane: DataPlaneServer, path: str, account: LocalAccount = REQUESTER, **kw):
    return sign_request(
        account=account,
        method="GET",
        url=plane.url + path,
        server_address=kw.pop("server_address", plane.node_address),
        **kw,
    )


def test_signed_fetch_returns_exactly_the_stored_bytes(
    server: DataPlaneServer, stored: str, blob: bytes
) -> None:
    fetched = _fetch(server, stored)
    assert fetched == blob
    assert id_hex(model_id(fetched)) == stored


def test_one_connection_keeps_working_after_refusals_and_blobs(
    server: DataPlaneServer, store: ModelStore, stored: str, blob: bytes
) -> None:
    # HTTP/1.1 keep-alive: each answer (JSON error or sendfile body) must be framed exactly.
    second = blob_of([np.ones(5, np.float32)])
    other = store.put(second)
    with pytest.raises(BlobNotFoundError):
        _fetch(server, "0x" + "ab" * 32)
    assert _fetch(server, stored) == blob
    assert _fetch(server, id_hex(other)) == second
    assert _connections(server) == 1
    assert len(server.connections) == 1


def test_peers_are_reached_through_the_environments_proxy_and_still_pinned(
    server: DataPlaneServer, stored: str, blob: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device behind a proxy reaches its peers through it (NO_PROXY exempts hosts), and the
    proxy sees only a tunnel: the TLS inside is the peer's own, pinned as without a proxy,
    so a proxy (or whoever controls it) that answers with a certificate of its own gets
    nothing, not even the signed request."""
    no_proxy_environment(monkeypatch)
    with forward_proxy() as proxy_url:
        monkeypatch.setenv("HTTPS_PROXY", proxy_url)
        assert health_check(base_url=server.url, cert_sha256=server.certificate.sha256) is None
        assert _fetch(server, stored) == blob
        other = cert_for("other").sha256
        assert "another TLS certificate" in (
            health_check(base_url=server.url, cert_sha256=other) or ""
        )
        with pytest.raises(PeerCertificateError):
            _fetch(server, stored, cert_sha256=other, retries=0)
    # The proxy is gone: reached through it, the peer is not reached at all.
    refused = health_check(base_url=server.url, cert_sha256=server.certificate.sha256)
    assert refused is not None
    assert "cannot be reached" in refused
    assert "proxy" in refused.lower()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert health_check(base_url=server.url, cert_sha256=server.certificate.sha256) is None


def test_a_proxy_that_asks_for_credentials_gets_those_its_url_names(
    server: DataPlaneServer, stored: str, blob: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_proxy_environment(monkeypatch)
    with forward_proxy(basic_auth="device:p@ss") as proxy_url:
        monkeypatch.setenv("HTTPS_PROXY", proxy_url)
        refused = health_check(base_url=server.url, cert_sha256=server.certificate.sha256)
        assert refused is not None
        assert "407" in refused
        monkeypatch.setenv("HTTPS_PROXY", proxy_url.replace("//", "//device:p%40ss@"))
        assert health_check(base_url=server.url, cert_sha256=server.certificate.sha256) is None
        assert _fetch(server, stored) == blob


def test_a_proxy_url_that_is_none_is_refused_naming_it_without_its_credentials(
    server: DataPlaneServer, stored: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_proxy_environment(monkeypatch)
    monkeypatch.setenv("HTTPS_PROXY", "ftp://device:secret@127.0.0.1:3128")
    with pytest.raises(ProxyUrlError) as exc:
        _fetch(server, stored)
    assert "ftp://127.0.0.1:3128" in exc.value.message
    assert "secret" not in exc.value.message
    assert "secret" not in repr(exc.value.fields)
    problem = health_check(base_url=server.url, cert_sha256=server.certificate.sha256) or ""
    assert "is not a proxy URL" in problem
    assert "secret" not in problem


def _connections(plane: DataPlaneServer) -> int:
    """How many connections this thread has made to ``plane`` on its kept pool."""
    return kept_pool(plane.url, sha256=plane.certificate.sha256).num_connections


def test_a_node_keeps_one_connection_to_a_peer_from_fetch_to_fetch(
    server: DataPlaneServer, stored: str, blob: bytes
) -> None:
    """Round after round a node fetches from the same peers: one TLS handshake, not one a
    fetch. The connection stays pinned: another certificate at the same URL is refused."""
    assert _fetch(server, stored) == blob
    assert _fetch(server, stored) == blob
    assert _connections(server) == 1
    assert len(server.connections) == 1
    with pytest.raises(PeerCertificateError):
        _fetch(server, stored, cert_sha256=cert_for("other").sha256, retries=0)
    assert _fetch(server, stored) == blob


def test_a_thread_keeps_connections_to_its_most_recent_peers_only(
    server: DataPlaneServer,
    store: ModelStore,
    stored: str,
    blob: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node that meets more peers than it keeps closes the connection it used longest ago
    (a socket held open to every peer ever met would run out of descriptors); that peer is
    reached again on a new one."""
    monkeypatch.setattr(dataplane.client, "KEPT_PEERS", 1)
    monkeypatch.setattr(dataplane.client, "_kept", threading.local())  # made with room for 1
    policy = AllowListPolicy(addresses=[REQUESTER.address])
    with DataPlaneServer(
        certificate=cert_for("second"), store=store, policy=policy, node_address=SERVER.address
    ) as second:
        assert _fetch(server, stored) == blob
        first = kept_pool(server.url, sha256=server.certificate.sha256)
        assert _fetch(second, stored) == blob
        assert first.pool is None  # closed, and its connection with it
        assert _fetch(server, stored) == blob
        assert kept_pool(server.url, sha256=server.certificate.sha256) is not first
        assert list(dataplane.client._kept.pools) == [server.url]


def test_a_stopped_server_serves_no_connection_kept_open_to_it(
    store: ModelStore, stored: str, blob: bytes
) -> None:
    policy = AllowListPolicy(addresses=[REQUESTER.address])
    plane = DataPlaneServer(
        certificate=cert_for("server"), store=store, policy=policy, node_address=SERVER.address
    )
    with plane:
        assert _fetch(plane, stored) == blob
    with pytest.raises(FetchFailedError):
        _fetch(plane, stored, retries=0)


def _wakeups(thread: threading.Thread) -> int:
    """How many times the thread has gone to sleep and woken since it started."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def test_an_idle_server_sleeps_until_a_peer_connects(server: DataPlaneServer) -> None:
    """A process may serve hundreds of simulated nodes' data planes: while nobody connects,
    none of them wakes to look for a stop, and a stop still ends the loop at once."""
    loop = server._thread
    assert loop is not None
    before = _wakeups(loop)
    time.sleep(1.0)
    assert _wakeups(loop) - before <= 1
    assert _get(server, "/health", {}).json()["status"] == "ok"
    assert _wakeups(loop) > before  # the connection woke it
    server.stop()
    assert not loop.is_alive()


def _fresh_in_child(url: str, sha256: str) -> bool:
    inherited = dataplane.client._kept.pools[url]  # what the fork copied from the parent
    return kept_pool(url, sha256=sha256) is not inherited


def test_a_forked_worker_does_not_write_to_its_parents_connections(
    server: DataPlaneServer, stored: str, blob: bytes
) -> None:
    assert _fetch(server, stored) == blob
    sha256 = server.certificate.sha256
    parent = kept_pool(server.url, sha256=sha256)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_fresh_in_child, (server.url, sha256)) is True
    assert kept_pool(server.url, sha256=sha256) is parent


def test_errors_keep_their_fields_across_pickling() -> None:
    error = AccessDeniedError(requester=REQUESTER.address, model_id="0x00", reason="no")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.message, copy.fields) == (type(error), error.message, error.fields)


def test_server_picks_a_free_port_and_stops(store: ModelStore) -> None:
    plane = DataPlaneServer(
        certificate=cert_for("server"),
        store=store,
        policy=AllowListPolicy(addresses=[]),
        node_address=SERVER.address,
    )
    plane.start()
    assert plane.port != 0
    health = _get(plane, "/health", {})
    plane.stop()
    assert health.json() == {
        "status": "ok",
        "address": SERVER.address,
        "max_bytes": plane.max_bytes,
    }
    with pytest.raises(urllib3.exceptions.HTTPError):
        _get(plane, "/health", {})


def test_unsigned_request_is_401_with_json_error(server: DataPlaneServer, stored: str) -> None:
    response = _get(server, f"/models/{stored}", {})
    assert response.status == 401
    assert response.json() == {
        "code": "auth_missing",
        "message": f"unsigned request: header {HEADER_ADDRESS} is missing",
        "fields": {"header": HEADER_ADDRESS},
    }


def test_signature_by_another_key_than_the_claimed_address_is_401(
    server: DataPlaneServer, stored: str
) -> None:
    path = f"/models/{stored}"
    headers = _signed(server, path, account=STRANGER)
    headers[HEADER_ADDRESS] = REQUESTER.address
    response = _get(server, path, headers)
    assert response.status == 401
    assert response.json()["code"] == "auth_bad_signature"


def test_stale_timestamp_is_401(server: DataPlaneServer, stored: str) -> None:
    path = f"/models/{stored}"
    headers = _signed(server, path, timestamp=int(time.time()) - 120)
    response = _get(server, path, headers)
    assert response.status == 401
    assert response.json()["code"] == "auth_expired"


def test_timestamp_inside_the_window_is_accepted(server: DataPlaneServer, stored: str) -> None:
    path = f"/models/{stored}"
    headers = _signed(server, path, timestamp=int(time.time()) - 30)
    assert _get(server, path, headers).status == 200


def test_signature_for_another_server_is_401(server: DataPlaneServer, stored: str) -> None:
    with pytest.raises(SignatureMismatchError) as exc:
        _fetch(server, stored, server_address=STRANGER.address)
    assert exc.value.status == 401
    assert exc.value.claimed == REQUESTER.address


def test_signature_for_another_path_is_401(
    server: DataPlaneServer, store: ModelStore, stored: str
) -> None:
    other = id_hex(store.put(blob_of([np.ones(3, np.float32)])))
    headers = _signed(server, f"/models/{other}")
    response = _get(server, f"/models/{stored}", headers)
    assert response.status == 401
    assert response.json()["code"] == "auth_bad_signature"


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (HEADER_SIGNATURE, "0x1234"),
        (HEADER_SIGNATURE, "not hex at all"),
        (HEADER_TIMESTAMP, "yesterday"),
        (HEADER_ADDRESS, "0xnot-an-address"),
    ],
)
def test_malformed_auth_header_is_401(
    server: DataPlaneServer, stored: str, header: str, value: str
) -> None:
    path = f"/models/{stored}"
    headers = _signed(server, path)
    headers[header] = value
    response = _get(server, path, headers)
    assert response.status == 401
    assert response.json()["code"] == "auth_malformed"
    assert response.json()["fields"]["header"] == header


def test_signature_with_invalid_curve_values_is_401_not_500(
    server: DataPlaneServer, stored: str
) -> None:
    path = f"/models/{stored}"
    headers = _signed(server, path)
    headers[HEADER_SIGNATURE] = "0x" + "ff" * 65
    response = _get(server, path, headers)
    assert response.status == 401
    assert response.json()["code"] == "auth_bad_signature"


def test_verify_request_returns_the_signer() -> None:
    headers = sign_request(
        account=REQUESTER,
        method="GET",
        url="https://Node.Example.org/x?y=1",
        server_address=SERVER.address,
    )
    signer = verify_request(
        headers=headers,
        method="GET",
        path="/x?y=1",
        authority="node.example.org:443",
        server_address=SERVER.address.lower(),
        nonces=MemoryNonces(),
    )
    assert signer == REQUESTER.address


def test_policy_refusal_is_403_naming_why_and_not_retried(store: ModelStore, stored: str) -> None:
    policy = _CountingPolicy(AllowListPolicy(addresses=[REQUESTER.address]))
    with (
        DataPlaneServer(
            certificate=cert_for("server"), store=store, policy=policy, node_address=SERVER.address
        ) as plane,
        pytest.raises(AccessDeniedError) as exc,
    ):
        _fetch(plane, stored, account=STRANGER)
    assert exc.value.status == 403
    assert exc.value.requester == STRANGER.address
    assert exc.value.reason == "not on the allow list"
    assert policy.calls == 1


def test_policy_that_cannot_decide_is_503_and_retried(store: ModelStore, stored: str) -> None:
    policy = _CountingPolicy(None)
    with (
        DataPlaneServer(
            certificate=cert_for("server"), store=store, policy=policy, node_address=SERVER.address
        ) as plane,
        pytest.raises(PolicyUnavailableError) as exc,
    ):
        _fetch(plane, stored)
    assert exc.value.status == 503
    assert policy.calls == 1 + FAST["retries"]


def test_unknown_id_is_404_and_not_retried(store: ModelStore) -> None:
    policy = _CountingPolicy(AllowListPolicy(addresses=[REQUESTER.address]))
    missing = "0x" + "ab" * 32
    with DataPlaneServer(
        certificate=cert_for("server"), store=store, policy=policy, node_address=SERVER.address
    ) as plane:
        started = time.monotonic()
        with pytest.raises(BlobNotFoundError) as exc:
            _fetch(plane, missing, backoff=1.0)
    assert exc.value.code == "model_not_found"
    assert exc.value.model_id == missing
    assert time.monotonic() - started < 1.0  # no back-off sleep: not retried


def test_malformed_id_and_unknown_route(server: DataPlaneServer) -> None:
    path = "/models/0x1234"
    headers = _signed(server, path)
    response = _get(server, path, headers)
    assert (response.status, response.json()["code"]) == (400, "model_id_malformed")
    response = _get(server, "/elsewhere", {})
    assert (response.status, response.json()["code"]) == (404, "route_not_found")
    response = pinned(server).request("POST", "/health", timeout=5)
    assert (response.status, response.json()["code"]) == (501, "http_501")


@pytest.mark.parametrize(
    "chunks", ["", "0,x", "0,,1", "-1", "1" * 13, ",".join(["0"] * 65)], ids=repr
)
def test_a_malformed_list_of_chunks_is_404_naming_it(
    server: DataPlaneServer, stored: str, chunks: str
) -> None:
    """Openings are asked for as 1 to 64 chunk numbers separated by commas; anything else is
    refused whole, by name, and the server goes on serving."""
    path = f"/models/{stored}/chunks/{chunks}"
    response = _get(server, path, _signed(server, path))
    assert (response.status, response.json()["code"]) == (404, "chunk_index_invalid")
    assert "separated by commas" in response.json()["message"]
    good = f"/models/{stored}/chunks/1,0"
    served, _ = Openings.unpack(_get(server, good, _signed(server, good)).data, 0, [1, 0])
    assert [o.index for o in served.check(stored)] == [1, 0]


def test_blob_above_the_server_limit_is_413(store: ModelStore, stored: str, blob: bytes) -> None:
    policy = AllowListPolicy(addresses=[REQUESTER.address])
    small = len(blob) - 1
    with (
        DataPlaneServer(
            certificate=cert_for("server"),
            store=store,
            policy=policy,
            node_address=SERVER.address,
            max_bytes=small,
        ) as plane,
        pytest.raises(ModelTooLargeError) as exc,
    ):
        _fetch(plane, stored)
    assert exc.value.status == 413
    assert (exc.value.size, exc.value.limit) == (len(blob), small)


def test_blob_above_the_client_limit_is_refused(
    server: DataPlaneServer, stored: str, blob: bytes
) -> None:
    with pytest.raises(ModelTooLargeError) as exc:
        _fetch(server, stored, max_bytes=len(blob) - 1)
    assert exc.value.size == len(blob)
    assert exc.value.url.startswith(server.url)


def test_tampered_blob_on_disk_fails_the_chunk_check(
    server: DataPlaneServer, store: ModelStore, stored: str, blob: bytes
) -> None:
    path = store.path(stored)
    path.chmod(0o644)
    tampered = bytearray(blob)
    tampered[-1] ^= 0xFF
    path.write_bytes(bytes(tampered))
    with pytest.raises(ChunkMismatchError) as exc:
        _fetch(server, stored)
    assert exc.value.index == 8  # 2058 values: the last chunk
    assert exc.value.url.startswith(server.url)


def test_rogue_server_bytes_fail_the_id_check(blob: bytes) -> None:
    wanted = id_hex(model_id(blob))
    another = blob_of([np.zeros((64, 32), np.float32), np.arange(10.0)])
    with (
        _rogue(lambda handler: _reply(handler, another)) as rogue,
        pytest.raises(ModelIdMismatchError) as exc,
    ):
        _fetch(rogue, wanted)
    assert exc.value.expected == wanted
    assert exc.value.actual == id_hex(model_id(another))


def test_a_bad_chunk_stops_the_download_there_and_is_not_retried() -> None:
    model = blob_of([np.linspace(-1, 1, 750_000, dtype=np.float32)])  # about 3 MB
    tampered = bytearray(model)
    flipped = len(model) - 2_900_000  # a value in the first MB of the stream
    tampered[flipped] ^= 1
    header, _ = read_header(model)
    values_start = len(model) - 4 * header.count
    rest_sent = threading.Event()
    release = threading.Event()

    def stall_after_the_first_part(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(tampered)))
        handler.end_headers()
        handler.wfile.write(tampered[:1_500_000])
        handler.wfile.flush()
        # The rest would only come after the client's timeout: it must not be needed.
        if release.wait(30):
            return
        rest_sent.set()

    with _rogue(stall_after_the_first_part) as rogue:
        try:
            with pytest.raises(ChunkMismatchError) as exc:
                _fetch(rogue, id_hex(model_id(model)))
        finally:
            release.set()
    assert exc.value.index == (flipped - values_start) // (4 * header.chunk_values)
    assert exc.value.url.startswith(rogue.url)
    assert rogue.hits == 1
    assert not rest_sent.is_set()


def test_truncated_response_is_retried_then_raised(blob: bytes) -> None:
    def truncate(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(blob)))
        handler.end_headers()
        handler.wfile.write(blob[:100])
        handler.close_connection = True

    with _rogue(truncate) as rogue, pytest.raises(FetchTruncatedError) as exc:
        _fetch(rogue, id_hex(model_id(blob)))
    assert (exc.value.expected_bytes, exc.value.received_bytes) == (len(blob), 100)
    assert rogue.hits == 1 + FAST["retries"]


def test_transient_server_errors_are_retried_until_success(blob: bytes) -> None:
    def flaky(handler: BaseHTTPRequestHandler) -> None:
        if handler.server.hits < 3:  # type: ignore[attr-defined]
            _reply(handler, b'{"code": "busy"}', status=503)
        else:
            _reply(handler, blob)

    with _rogue(flaky) as rogue:
        assert _fetch(rogue, id_hex(model_id(blob))) == blob
    assert rogue.hits == 3


def test_unreachable_peer_fails_after_retries() -> None:
    with pytest.raises(FetchFailedError) as exc:
        fetch_model(
            base_url=f"https://127.0.0.1:{free_port()}",
            cert_sha256="00" * 32,
            model_id="0x" + "00" * 32,
            server_address=SERVER.address,
            account=REQUESTER,
            **FAST,
        )
    assert exc.value.attempts == 1 + FAST["retries"]
    assert "ConnectionError" in exc.value.reason


def test_large_blob_is_streamed_without_holding_it_in_memory(store: ModelStore) -> None:
    values = np.arange(12_500_000, dtype=np.int32)
    blob = blob_of([values], kind=Kind.GLOBAL, round_number=2)
    size = len(blob)
    big = id_hex(store.put(blob))
    del blob
    policy = AllowListPolicy(addresses=[REQUESTER.address])
    with DataPlaneServer(
        certificate=cert_for("server"), store=store, policy=policy, node_address=SERVER.address
    ) as plane:
        path = f"/models/{big}"
        headers = _signed(plane, path)
        tracemalloc.start()
        try:
            received = 0
            with pinned(plane).request(
                "GET", path, headers=headers, timeout=10, preload_content=False
            ) as r:
                assert r.headers["Content-Length"] == str(size)
                for chunk in r.stream(256 * 1024):
                    received += len(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert received == size
    # Server and client share this process: the peak covers both, and stays far below the blob.
    assert peak < 8 * 1024 * 1024, f"peak Python allocation {peak} bytes for a {size}-byte blob"


class _CountingPolicy:
    """Delegates to ``inner`` (None: fails as a policy whose chain is down) and counts calls."""

    def __init__(self, inner: AllowListPolicy | None) -> None:
        self.inner = inner
        self.calls = 0

    def authorize_fetch(self, *, requester: str, meta: StoredModel) -> None:
        self.calls += 1
        if self.inner is None:
            raise ConnectionError("chain node unreachable")
        self.inner.authorize_fetch(requester=requester, meta=meta)


class _RogueServer(ThreadingHTTPServer):
    """Stands where a peer's data plane should be, with the certificate pinned for it (a peer
    gone bad, not an impostor); counts the GETs it answered."""

    daemon_threads = True
    hits = 0
    url = ""
    node_address = SERVER.address
    certificate = cert_for("rogue")


def _reply(handler: BaseHTTPRequestHandler, body: bytes, status: int = 200) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@contextmanager
def _rogue(respond: Callable[[BaseHTTPRequestHandler], None]) -> Iterator[_RogueServer]:
    """A tiny HTTPS server on 127.0.0.1 answering every GET with ``respond(handler)``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.server.hits += 1  # type: ignore[attr-defined]
            respond(self)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = _RogueServer(("127.0.0.1", 0), Handler)
    httpd.socket = httpd.certificate.server_context().wrap_socket(httpd.socket, server_side=True)
    httpd.url = f"https://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
