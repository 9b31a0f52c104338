"""The data plane over real sockets: signed fetches, refusals, size caps, verification, retries."""

from __future__ import annotations

import pickle
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from chain.client import FlexMarket
from chain.events import DeviceClass, Role, TaskCreated
from chain.launcher import dev_accounts, free_port
from dataplane.access import AllowListPolicy, ChainPolicy
from dataplane.client import fetch_model
from dataplane.protocol import (
    HEADER_ADDRESS,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    AccessDeniedError,
    FetchFailedError,
    FetchTruncatedError,
    ModelTooLargeError,
    PolicyUnavailableError,
    SignatureMismatchError,
)
from dataplane.server import DataPlaneServer
from dataplane.signing import sign_request, verify_request
from tests.blobs import blob_of
from training.errors import BlobNotFoundError, ChunkMismatchError, ModelIdMismatchError
from training.serialize import Kind, id_hex, model_id, read_header
from training.store import ModelStore, StoredModel

SERVER = Account.from_key(b"\x01" * 32)
REQUESTER = Account.from_key(b"\x02" * 32)
STRANGER = Account.from_key(b"\x03" * 32)
FAST = {"retries": 2, "backoff": 0.01, "timeout": 5.0}


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


@pytest.fixture
def server(store: ModelStore) -> Iterator[DataPlaneServer]:
    policy = AllowListPolicy(addresses=[REQUESTER.address])
    with DataPlaneServer(store=store, policy=policy, node_address=SERVER.address) as plane:
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
        model_id=mid,
        server_address=kw.pop("server_address", plane.node_address),
        account=account,
        **{**FAST, **kw},
    )


def _get(plane: DataPlaneServer, path: str, headers: dict[str, str]) -> requests.Response:
    return requests.get(plane.url + path, headers=headers, timeout=5)


def test_signed_fetch_returns_exactly_the_stored_bytes(
    server: DataPlaneServer, stored: str, blob: bytes
) -> None:
    fetched = _fetch(server, stored)
    assert fetched == blob
    assert id_hex(model_id(fetched)) == stored


def test_one_session_keeps_working_after_refusals_and_blobs(
    server: DataPlaneServer, store: ModelStore, stored: str, blob: bytes
) -> None:
    # HTTP/1.1 keep-alive: each answer (JSON error or sendfile body) must be framed exactly.
    second = blob_of([np.ones(5, np.float32)])
    other = store.put(second)
    with requests.Session() as session:
        with pytest.raises(BlobNotFoundError):
            _fetch(server, "0x" + "ab" * 32, session=session)
        assert _fetch(server, stored, session=session) == blob
        assert _fetch(server, id_hex(other), session=session) == second


def test_errors_keep_their_fields_across_pickling() -> None:
    error = AccessDeniedError(requester=REQUESTER.address, model_id="0x00", reason="no")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.message, copy.fields) == (type(error), error.message, error.fields)


def test_server_picks_a_free_port_and_stops(store: ModelStore) -> None:
    plane = DataPlaneServer(
        store=store, policy=AllowListPolicy(addresses=[]), node_address=SERVER.address
    )
    plane.start()
    assert plane.port != 0
    health = requests.get(plane.url + "/health", timeout=5)
    plane.stop()
    assert health.json() == {
        "status": "ok",
        "address": SERVER.address,
        "max_bytes": plane.max_bytes,
    }
    with pytest.raises(requests.ConnectionError):
        requests.get(plane.url + "/health", timeout=5)


def test_unsigned_request_is_401_with_json_error(server: DataPlaneServer, stored: str) -> None:
    response = _get(server, f"/models/{stored}", {})
    assert response.status_code == 401
    assert response.json() == {
        "code": "auth_missing",
        "message": f"unsigned request: header {HEADER_ADDRESS} is missing",
        "fields": {"header": HEADER_ADDRESS},
    }


def test_signature_by_another_key_than_the_claimed_address_is_401(
    server: DataPlaneServer, stored: str
) -> None:
    path = f"/models/{stored}"
    headers = sign_request(
        account=STRANGER, method="GET", path=path, server_address=server.node_address
    )
    headers[HEADER_ADDRESS] = REQUESTER.address
    response = _get(server, path, headers)
    assert response.status_code == 401
    assert response.json()["code"] == "auth_bad_signature"


def test_stale_timestamp_is_401(server: DataPlaneServer, stored: str) -> None:
    path = f"/models/{stored}"
    headers = sign_request(
        account=REQUESTER,
        method="GET",
        path=path,
        server_address=server.node_address,
        timestamp=int(time.time()) - 120,
    )
    response = _get(server, path, headers)
    assert response.status_code == 401
    assert response.json()["code"] == "auth_expired"


def test_timestamp_inside_the_window_is_accepted(server: DataPlaneServer, stored: str) -> None:
    path = f"/models/{stored}"
    headers = sign_request(
        account=REQUESTER,
        method="GET",
        path=path,
        server_address=server.node_address,
        timestamp=int(time.time()) - 30,
    )
    assert _get(server, path, headers).status_code == 200


def test_signature_for_another_server_is_401(server: DataPlaneServer, stored: str) -> None:
    with pytest.raises(SignatureMismatchError) as exc:
        _fetch(server, stored, server_address=STRANGER.address)
    assert exc.value.status == 401
    assert exc.value.claimed == REQUESTER.address


def test_signature_for_another_path_is_401(
    server: DataPlaneServer, store: ModelStore, stored: str
) -> None:
    other = id_hex(store.put(blob_of([np.ones(3, np.float32)])))
    headers = sign_request(
        account=REQUESTER, method="GET", path=f"/models/{other}", server_address=SERVER.address
    )
    response = _get(server, f"/models/{stored}", headers)
    assert response.status_code == 401
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
    headers = sign_request(
        account=REQUESTER, method="GET", path=path, server_address=SERVER.address
    )
    headers[header] = value
    response = _get(server, path, headers)
    assert response.status_code == 401
    assert response.json()["code"] == "auth_malformed"
    assert response.json()["fields"]["header"] == header


def test_signature_with_invalid_curve_values_is_401_not_500(
    server: DataPlaneServer, stored: str
) -> None:
    path = f"/models/{stored}"
    headers = sign_request(
        account=REQUESTER, method="GET", path=path, server_address=SERVER.address
    )
    headers[HEADER_SIGNATURE] = "0x" + "ff" * 65
    response = _get(server, path, headers)
    assert response.status_code == 401
    assert response.json()["code"] == "auth_bad_signature"


def test_verify_request_returns_the_signer() -> None:
    headers = sign_request(
        account=REQUESTER, method="GET", path="/x", server_address=SERVER.address
    )
    signer = verify_request(
        headers=headers, method="GET", path="/x", server_address=SERVER.address.lower()
    )
    assert signer == REQUESTER.address


def test_policy_refusal_is_403_naming_why_and_not_retried(store: ModelStore, stored: str) -> None:
    policy = _CountingPolicy(AllowListPolicy(addresses=[REQUESTER.address]))
    with (
        DataPlaneServer(store=store, policy=policy, node_address=SERVER.address) as plane,
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
        DataPlaneServer(store=store, policy=policy, node_address=SERVER.address) as plane,
        pytest.raises(PolicyUnavailableError) as exc,
    ):
        _fetch(plane, stored)
    assert exc.value.status == 503
    assert policy.calls == 1 + FAST["retries"]


def test_unknown_id_is_404_and_not_retried(store: ModelStore) -> None:
    policy = _CountingPolicy(AllowListPolicy(addresses=[REQUESTER.address]))
    missing = "0x" + "ab" * 32
    with DataPlaneServer(store=store, policy=policy, node_address=SERVER.address) as plane:
        started = time.monotonic()
        with pytest.raises(BlobNotFoundError) as exc:
            _fetch(plane, missing, backoff=1.0)
    assert exc.value.code == "model_not_found"
    assert exc.value.model_id == missing
    assert time.monotonic() - started < 1.0  # no back-off sleep: not retried


def test_malformed_id_and_unknown_route(server: DataPlaneServer) -> None:
    path = "/models/0x1234"
    headers = sign_request(
        account=REQUESTER, method="GET", path=path, server_address=SERVER.address
    )
    response = _get(server, path, headers)
    assert (response.status_code, response.json()["code"]) == (400, "model_id_malformed")
    response = _get(server, "/elsewhere", {})
    assert (response.status_code, response.json()["code"]) == (404, "route_not_found")
    response = requests.post(server.url + "/health", timeout=5)
    assert (response.status_code, response.json()["code"]) == (501, "http_501")


def test_blob_above_the_server_limit_is_413(store: ModelStore, stored: str, blob: bytes) -> None:
    policy = AllowListPolicy(addresses=[REQUESTER.address])
    small = len(blob) - 1
    with (
        DataPlaneServer(
            store=store, policy=policy, node_address=SERVER.address, max_bytes=small
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
            base_url=f"http://127.0.0.1:{free_port()}",
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
    with DataPlaneServer(store=store, policy=policy, node_address=SERVER.address) as plane:
        path = f"/models/{big}"
        headers = sign_request(
            account=REQUESTER, method="GET", path=path, server_address=SERVER.address
        )
        tracemalloc.start()
        try:
            received = 0
            with requests.get(plane.url + path, headers=headers, stream=True, timeout=10) as r:
                assert r.headers["Content-Length"] == str(size)
                for chunk in r.iter_content(256 * 1024):
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
    """Stands where a peer's data plane should be; counts the GETs it answered."""

    daemon_threads = True
    hits = 0
    url = ""
    node_address = SERVER.address


def _reply(handler: BaseHTTPRequestHandler, body: bytes, status: int = 200) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@contextmanager
def _rogue(respond: Callable[[BaseHTTPRequestHandler], None]) -> Iterator[_RogueServer]:
    """A tiny HTTP server on 127.0.0.1 answering every GET with ``respond(handler)``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.server.hits += 1  # type: ignore[attr-defined]
            respond(self)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = _RogueServer(("127.0.0.1", 0), Handler)
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


# ---------------------------------------------------------------- access rules on the real chain


@dataclass(frozen=True)
class OnChain:
    """A deployed market with task ``task_id`` selected and task ``bidding_id`` still open."""

    market: FlexMarket
    task_id: int
    bidding_id: int
    owner: LocalAccount
    buyer: LocalAccount
    aggregator: LocalAccount
    trainers: tuple[LocalAccount, ...]
    outsider: LocalAccount


def _rpc(w3: Web3, method: str, *params: object) -> object:
    return w3.provider.make_request(method, list(params))["result"]  # type: ignore[arg-type]


@contextmanager
def _snapshot(w3: Web3) -> Iterator[None]:
    snapshot = _rpc(w3, "evm_snapshot")
    try:
        yield
    finally:
        _rpc(w3, "evm_revert", snapshot)


@pytest.fixture(scope="module")
def on_chain(w3: Web3) -> Iterator[OnChain]:
    owner, buyer, aggregator, t1, t2, outsider = dev_accounts(6, start=13)
    with _snapshot(w3):
        market = FlexMarket.deploy(w3=w3, sender=owner)
        for device, can_aggregate in ((aggregator, True), (t1, False), (t2, False)):
            market.register_device(
                sender=owner,
                device=device.address,
                device_class=DeviceClass.CPU,
                can_aggregate=can_aggregate,
            )
        ids = []
        for _ in range(2):
            now = w3.eth.get_block("latest")["timestamp"]
            created = market.create_task(
                sender=buyer,
                spec_hash=b"\x11" * 32,
                rounds=2,
                min_trainers=1,
                max_trainers=4,
                bidding_ends=now + 100,
                round_timeout=600,
                budget_wei=10**15,
            )
            ids.append(created.first(TaskCreated).task_id)
        task_id, bidding_id = ids
        market.place_bid(
            sender=aggregator,
            task_id=task_id,
            price_per_round_wei=1,
            samples=0,
            role=Role.AGGREGATOR,
        )
        for trainer in (t1, t2):
            market.place_bid(
                sender=trainer,
                task_id=task_id,
                price_per_round_wei=1,
                samples=100,
                role=Role.TRAINER,
            )
        _rpc(w3, "evm_increaseTime", 200)
        _rpc(w3, "evm_mine")
        market.select_nodes(sender=buyer, task_id=task_id)
        yield OnChain(market, task_id, bidding_id, owner, buyer, aggregator, (t1, t2), outsider)


def _meta(kind: str | None, task_id: int | None) -> StoredModel:
    return StoredModel(
        model_id=b"\x42" * 32,
        size=1,
        kind=kind,
        chain_id=31337,
        contract="0x" + "00" * 20,
        task_id=task_id,
        round_number=0,
        trainer="0x" + "00" * 20,
        created=datetime.now(tz=UTC),
    )


def test_chain_selection_is_what_the_rules_are_tested_against(on_chain: OnChain) -> None:
    selection = on_chain.market.selection(task_id=on_chain.task_id)
    assert selection is not None
    assert selection.aggregator == on_chain.aggregator.address
    assert set(selection.trainers) == {t.address for t in on_chain.trainers}


def test_only_the_aggregator_may_fetch_an_update(on_chain: OnChain) -> None:
    policy = ChainPolicy(market=on_chain.market)
    update = _meta("update", on_chain.task_id)
    policy.authorize_fetch(requester=on_chain.aggregator.address, meta=update)
    for other in (*on_chain.trainers, on_chain.buyer, on_chain.outsider):
        with pytest.raises(AccessDeniedError, match=r"only task .* aggregator") as exc:
            policy.authorize_fetch(requester=other.address, meta=update)
        assert exc.value.requester == other.address
        assert exc.value.task_id == on_chain.task_id


def test_selected_nodes_and_buyer_may_fetch_a_global_model(on_chain: OnChain) -> None:
    policy = ChainPolicy(market=on_chain.market)
    global_model = _meta("global", on_chain.task_id)
    for party in (on_chain.buyer, on_chain.aggregator, *on_chain.trainers):
        policy.authorize_fetch(requester=party.address.lower(), meta=global_model)
    with pytest.raises(AccessDeniedError, match="buyer, aggregator and selected trainers"):
        policy.authorize_fetch(requester=on_chain.outsider.address, meta=global_model)


def test_blobs_of_unselected_or_unknown_tasks_or_no_task_are_refused(on_chain: OnChain) -> None:
    policy = ChainPolicy(market=on_chain.market)
    buyer = on_chain.buyer.address
    with pytest.raises(AccessDeniedError, match=r"no selected nodes \(bidding\)"):
        policy.authorize_fetch(requester=buyer, meta=_meta("global", on_chain.bidding_id))
    with pytest.raises(AccessDeniedError, match="does not exist on chain"):
        policy.authorize_fetch(requester=buyer, meta=_meta("global", 10_000))
    with pytest.raises(AccessDeniedError, match="not indexed as a task's"):
        policy.authorize_fetch(requester=buyer, meta=_meta(None, None))


def test_revoked_device_loses_access_once_the_cache_expires(w3: Web3, on_chain: OnChain) -> None:
    now = [1000.0]
    policy = ChainPolicy(market=on_chain.market, ttl=10.0, clock=lambda: now[0])
    trainer = on_chain.trainers[0].address
    global_model = _meta("global", on_chain.task_id)
    with _snapshot(w3):
        policy.authorize_fetch(requester=trainer, meta=global_model)
        on_chain.market.revoke_device(sender=on_chain.owner, device=trainer)
        now[0] += 9.0
        policy.authorize_fetch(requester=trainer, meta=global_model)  # answer still cached
        now[0] += 2.0
        with pytest.raises(AccessDeniedError, match="revoked"):
            policy.authorize_fetch(requester=trainer, meta=global_model)
        # The aggregator's access is untouched by a trainer's revocation.
        policy.authorize_fetch(requester=on_chain.aggregator.address, meta=global_model)


def test_chain_policy_over_http(store: ModelStore, on_chain: OnChain) -> None:
    trainer = on_chain.trainers[0]
    blob = blob_of([np.ones(4, np.float32)], task_id=on_chain.task_id, trainer=trainer.address)
    update = store.put(blob)
    policy = ChainPolicy(market=on_chain.market)
    with DataPlaneServer(store=store, policy=policy, node_address=trainer.address) as plane:
        assert _fetch(plane, id_hex(update), account=on_chain.aggregator) == blob
        with pytest.raises(AccessDeniedError) as exc:
            _fetch(plane, id_hex(update), account=on_chain.trainers[1])
    assert exc.value.status == 403
    assert on_chain.aggregator.address in exc.value.reason


def test_unreachable_chain_is_503_not_access(store: ModelStore, on_chain: OnChain) -> None:
    dead = Web3(Web3.HTTPProvider(f"http://127.0.0.1:{free_port()}", request_kwargs={"timeout": 2}))
    policy = ChainPolicy(market=FlexMarket(w3=dead, address=on_chain.market.address))
    update = store.put(blob_of([np.ones(2, np.float32)], task_id=on_chain.task_id))
    with (
        DataPlaneServer(store=store, policy=policy, node_address=SERVER.address) as plane,
        pytest.raises(PolicyUnavailableError),
    ):
        _fetch(plane, id_hex(update), account=on_chain.aggregator, retries=0)
