"""The client's plumbing: nonces under concurrency, a lost node, results."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import multiprocessing
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trustme
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from chain.client import FlexMarket
from chain.errors import (
    ChainUnavailableError,
    InvalidTaskStateError,
    NoContractError,
    TransactionRejectedError,
    UnknownTaskError,
)
from chain.events import DeviceClass, DeviceRegistered, DeviceStatus, TaskCreated, TaskState
from chain.launcher import ChainLaunchError, LocalChain, free_port
from chain.node import client, connect
from chain.records import TxResult
from chain.transactions import PendingTx, submit
from core.proxies import ProxyUrlError
from tests.chain.conftest import Accounts, Flow
from tests.processes import running
from tests.proxies import forward_proxy, no_proxy_environment

ROOT = Path(__file__).resolve().parents[2]


def test_one_account_sends_many_transactions_at_once(market: FlexMarket, accounts: Accounts):
    devices = [Account.create().address for _ in range(12)]

    def register(device: str) -> TxResult:
        return market.register_device(
            sender=accounts.owner, device=device, device_class=DeviceClass.CPU, can_aggregate=False
        )

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(register, devices))
    assert [r.first(DeviceRegistered).device for r in results] == devices
    assert len({r.tx_hash for r in results}) == len(devices)
    assert all(market.device(device=d).status == DeviceStatus.ACTIVE for d in devices)


def test_transactions_in_a_row_from_one_account(market: FlexMarket, flow: Flow):
    ids = [flow.create_task() for _ in range(4)]
    assert ids == [1, 2, 3, 4]


def test_lost_node_is_chain_unavailable(market: FlexMarket, accounts: Accounts):
    dead = client(f"http://127.0.0.1:{free_port()}", timeout=2)
    offline = FlexMarket(w3=dead, address=market.address)
    with pytest.raises(ChainUnavailableError) as exc:
        offline.task_count()
    assert exc.value.code == "chain_unavailable"
    with pytest.raises(ChainUnavailableError):
        offline.withdraw(sender=accounts.buyer)


@contextlib.contextmanager
def _serving(
    handler: type[http.server.BaseHTTPRequestHandler],
    *,
    node_url: str = "",
    tls: ssl.SSLContext | None = None,
) -> Iterator[Any]:
    """A server on a free loopback port (over ``tls`` if given) counting its posts, for
    ``handler`` (whose ``server.node`` is ``node_url``'s host:port, and ``server.methods``
    the JSON-RPC methods asked, in order)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.posts, server.node = 0, urlsplit(node_url).netloc  # type: ignore[attr-defined]
    server.methods = []  # type: ignore[attr-defined]
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A proxy in front of a node that is down: every request gets 503."""

    def do_POST(self) -> None:
        self.server.posts += 1  # type: ignore[attr-defined]
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_error(503)

    def log_message(self, *args: object) -> None:
        pass


def test_an_error_status_from_the_node_is_tried_again_then_chain_unavailable(
    market: FlexMarket,
):
    with _serving(_Refusing) as server:
        refused = FlexMarket(
            w3=client(f"http://127.0.0.1:{server.server_port}"), address=market.address
        )
        # As web3's own provider: five tries of a call safe to repeat, then an error that
        # names the status.
        with pytest.raises(ChainUnavailableError, match="HTTP 503"):
            refused.task_count()
        assert server.posts == 5
        # So is a batch of them.
        with pytest.raises(ChainUnavailableError, match="HTTP 503"):
            refused.at_once(refused.task_count, refused.owner)
        assert server.posts == 10


class _Forwarding(http.server.BaseHTTPRequestHandler):
    """Passes each JSON-RPC post on to the node (``server.node``, host:port) and its answer
    back, counting them: a proxy (asked for an absolute URL) or a TLS front for the node.
    A batch is recorded in ``server.methods`` as the tuple of its methods."""

    def do_POST(self) -> None:
        self.server.posts += 1  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = json.loads(body)
        if isinstance(request, list):
            self.server.methods.append(tuple(r["method"] for r in request))  # type: ignore[attr-defined]
            answer = self.answer_batch(request, body)
        else:
            self.server.methods.append(request["method"])  # type: ignore[attr-defined]
            answer = self.answer(request, body)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def answer(self, request: dict, body: bytes) -> bytes:
        return self.forward(body)

    def answer_batch(self, requests: list, body: bytes) -> bytes:
        return self.forward(body)

    def forward(self, body: bytes) -> bytes:
        node = http.client.HTTPConnection(self.server.node, timeout=30)  # type: ignore[attr-defined]
        try:
            node.request("POST", "/", body=body, headers={"Content-Type": "application/json"})
            return node.getresponse().read()
        finally:
            node.close()

    def log_message(self, *args: object) -> None:
        pass


class _WithoutSendSync(_Forwarding):
    """A node that predates EIP-7966: it has no eth_sendRawTransactionSync."""

    def answer(self, request: dict, body: bytes) -> bytes:
        if request["method"] != "eth_sendRawTransactionSync":
            return self.forward(body)
        error = {"code": -32601, "message": "the method does not exist/is not available"}
        return json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": error}).encode()


class _WithoutBatches(_Forwarding):
    """A node (or a gateway in front of it) that takes no JSON-RPC batches: it answers one
    with a single error that names no request."""

    def answer_batch(self, requests: list, body: bytes) -> bytes:
        error = {"code": -32600, "message": "batch requests are not supported"}
        return json.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()


class _WithoutTipMethod(_Forwarding):
    """A node without eth_maxPriorityFeePerGas (the method is not in the standard API), in
    a batch or alone."""

    MISSING = {"code": -32601, "message": "the method eth_maxPriorityFeePerGas does not exist"}

    def answer(self, request: dict, body: bytes) -> bytes:
        if request["method"] != "eth_maxPriorityFeePerGas":
            return self.forward(body)
        return json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": self.MISSING}).encode()

    def answer_batch(self, requests: list, body: bytes) -> bytes:
        answers = json.loads(self.forward(body))
        for answer in answers:
            asked = next(r for r in requests if r["id"] == answer["id"])
            if asked["method"] == "eth_maxPriorityFeePerGas":
                answer.pop("result", None)
                answer["error"] = self.MISSING
        return json.dumps(answers).encode()


class _SendSyncTimingOut(_Forwarding):
    """A node that takes the transaction but does not see it mined within its own wait: it
    answers EIP-7966's timeout error, naming the transaction."""

    def answer(self, request: dict, body: bytes) -> bytes:
        if request["method"] != "eth_sendRawTransactionSync":
            return self.forward(body)
        sent = json.loads(
            self.forward(json.dumps({**request, "method": "eth_sendRawTransaction"}).encode())
        )
        error = {"code": 4, "message": "timeout", "data": sent["result"]}
        return json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": error}).encode()


def test_the_node_is_reached_through_the_environments_proxy_unless_exempt(
    chain_node, market: FlexMarket, monkeypatch: pytest.MonkeyPatch
):
    no_proxy_environment(monkeypatch)
    with _serving(_Forwarding, node_url=chain_node.rpc_url) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_port}")
        proxied = FlexMarket(w3=client(chain_node.rpc_url), address=market.address)
        assert proxied.task_count() == market.task_count()
        assert proxy.posts == 1
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        direct = FlexMarket(w3=client(chain_node.rpc_url), address=market.address)
        assert direct.task_count() == market.task_count()
        assert proxy.posts == 1


def test_a_proxy_that_asks_for_credentials_gets_those_its_url_names(
    chain_node, market: FlexMarket, monkeypatch: pytest.MonkeyPatch
):
    no_proxy_environment(monkeypatch)
    with forward_proxy(basic_auth="device:p@ss") as proxy_url:
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        refused = FlexMarket(w3=client(chain_node.rpc_url), address=market.address)
        with pytest.raises(ChainUnavailableError, match="407"):
            refused.task_count()
        monkeypatch.setenv("HTTP_PROXY", proxy_url.replace("//", "//device:p%40ss@"))
        proxied = FlexMarket(w3=client(chain_node.rpc_url), address=market.address)
        assert proxied.task_count() == market.task_count()


def test_a_proxy_url_that_is_none_is_refused_when_the_client_is_made(
    chain_node, monkeypatch: pytest.MonkeyPatch
):
    no_proxy_environment(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", "socks9://127.0.0.1:1080")
    with pytest.raises(ProxyUrlError, match=r"socks9://127\.0\.0\.1:1080"):
        client(chain_node.rpc_url)


def test_a_node_behind_tls_is_trusted_through_the_ca_bundle_only(
    chain_node, market: FlexMarket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """An operator's node behind TLS, signed by their own CA: reached once the CA bundle
    names it (REQUESTS_CA_BUNDLE, as requests reads it), refused as unreachable before."""
    authority = trustme.CA()
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("127.0.0.1").configure_cert(tls)
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    with _serving(_Forwarding, node_url=chain_node.rpc_url, tls=tls) as front:
        url = f"https://127.0.0.1:{front.server_port}"
        with pytest.raises(ChainUnavailableError, match="certificate verify failed"):
            FlexMarket(w3=client(url), address=market.address).task_count()
        assert front.posts == 0
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
        trusted = FlexMarket(w3=client(url), address=market.address)
        assert trusted.task_count() == market.task_count()
        assert front.posts == 1


def test_a_restarted_node_is_asked_again_over_new_connections(accounts: Accounts):
    """Connections to the node are kept open between calls: after the node restarts, the
    next read and the next transaction are answered, not refused on a dead connection."""
    with LocalChain(accounts=20) as node:
        w3 = client(node.rpc_url)
        assert w3.eth.block_number == 0
        submit(w3, accounts.spare[1], {"to": accounts.spare[0].address, "value": 1}).receipt()
        node.stop()
        node.start()
        assert w3.eth.block_number == 0  # a fresh chain: nothing kept
        payee = Account.create().address
        submit(w3, accounts.spare[1], {"to": payee, "value": 3}).receipt()
        assert w3.eth.get_balance(payee) == 3


def test_a_node_that_cannot_start_says_why(tmp_path: Path):
    """A local node that cannot start fails at once with the node's own reason, not only
    its exit code: its port taken, its state file damaged."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ChainLaunchError, match=rf"port {port}: .*[Aa]ddress already in use"):
            LocalChain(accounts=1, port=port).start()
    state = tmp_path / "state.json"
    state.write_text("{not json")
    with pytest.raises(ChainLaunchError) as damaged:
        LocalChain(accounts=1, state_path=state).start()
    assert re.search(r"exited with code \d+ on port \d+: .*state.json", damaged.value.message)
    assert damaged.value.message.endswith(
        f"(the chain saved in {state} cannot be read: move it away, or `make clean` to start "
        "the local platform afresh)"
    )


def test_a_node_stopped_while_it_starts_is_not_left_running(tmp_path: Path):
    """`python -m chain.launcher` (make run's chain) told to stop before its node answers:
    the node it started stops too, instead of running on with no one to stop it (and
    holding the port the next run needs). The node is frozen until the launcher is told,
    so that it is still starting then, whatever the machine's speed."""
    state = tmp_path / "state.json"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "chain.launcher", "--port", str(free_port()), "--state", str(state)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300  # waited for, never timed
        while not (nodes := running(f"anvil.*{state}")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert nodes, "the launcher started no node"
        for pid in nodes:
            os.kill(pid, signal.SIGSTOP)
        launcher.send_signal(signal.SIGTERM)
        for pid in nodes:
            os.kill(pid, signal.SIGCONT)
        assert launcher.wait(timeout=300) == 0
        while running(f"anvil.*{state}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running(f"anvil.*{state}") == {}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        for pid in running(f"anvil.*{state}"):
            os.kill(pid, signal.SIGKILL)


def test_a_waited_transaction_comes_back_mined_from_one_send(
    chain_node, market: FlexMarket, flow: Flow
):
    """A transaction the sender waits for goes out by EIP-7966's send, whose answer is its
    receipt once mined: no asking for the receipt until it is there."""
    task_id = flow.create_task()
    with _serving(_Forwarding, node_url=chain_node.rpc_url) as front:
        fronted = FlexMarket(
            w3=client(f"http://127.0.0.1:{front.server_port}"), address=market.address
        )
        result = fronted.cancel_task(sender=flow.accounts.buyer, task_id=task_id)
        assert front.methods.count("eth_sendRawTransactionSync") == 1
        assert "eth_sendRawTransaction" not in front.methods
        assert "eth_getTransactionReceipt" not in front.methods
        # What the caller gets is the mined transaction's, as from a receipt asked for.
        assert result.gas_used > 0
        assert result.fee_wei == result.gas_used * result.effective_gas_price_wei
        assert market.task(task_id=task_id).state == TaskState.CANCELLED
        # One that is not waited for goes out the plain way: its sender sends on at once.
        payee = Account.create().address
        pending = submit(fronted.w3, flow.accounts.spare[0], {"to": payee, "value": 2})
        assert front.methods[-1] == "eth_sendRawTransaction"
        assert pending.receipt()["status"] == 1


def _two_tasks_cancelled(front: Any, market: FlexMarket, flow: Flow) -> tuple[FlexMarket, int]:
    """Two tasks created, then cancelled through ``front``: the market as seen through it,
    and the last task."""
    fronted = FlexMarket(w3=client(f"http://127.0.0.1:{front.server_port}"), address=market.address)
    for _ in range(2):
        task_id = flow.create_task()
        fronted.cancel_task(sender=flow.accounts.buyer, task_id=task_id)
        assert market.task(task_id=task_id).state == TaskState.CANCELLED
    return fronted, task_id


PRICED = ("eth_maxPriorityFeePerGas", "eth_estimateGas", "eth_getBlockByNumber")
NONCE = "eth_getTransactionCount"


def test_a_transaction_is_priced_and_estimated_in_one_request(
    chain_node, market: FlexMarket, flow: Flow
):
    """The tip, the gas estimate, the base fee and the nonce go to the node as one batch,
    then the transaction. Under a lock other processes share, the nonce is asked under it,
    apart. A call the estimate finds reverting raises its own error, and nothing is sent."""
    task_id = flow.create_task()
    with _serving(_Forwarding, node_url=chain_node.rpc_url) as front:
        fronted = FlexMarket(
            w3=client(f"http://127.0.0.1:{front.server_port}"), address=market.address
        )
        fronted.cancel_task(sender=flow.accounts.buyer, task_id=task_id)
        asked = [m for m in front.methods if m != "eth_chainId"]  # asked once per process
        assert asked == [(*PRICED, NONCE), "eth_sendRawTransactionSync"]
        assert market.task(task_id=task_id).state == TaskState.CANCELLED
        del front.methods[:]
        with pytest.raises(InvalidTaskStateError):
            fronted.cancel_task(sender=flow.accounts.buyer, task_id=task_id)
        assert front.methods == [(*PRICED, NONCE)]
        del front.methods[:]
        payee = Account.create().address
        call = {"to": payee, "value": 4}
        submit(fronted.w3, flow.accounts.spare[0], call, sending=threading.Lock()).receipt()
        assert front.methods[:3] == [PRICED, NONCE, "eth_sendRawTransaction"]
        assert market.w3.eth.get_balance(payee) == 4


def test_a_node_that_takes_no_batches_is_asked_one_request_at_a_time(
    chain_node, market: FlexMarket, flow: Flow
):
    with _serving(_WithoutBatches, node_url=chain_node.rpc_url) as front:
        fronted, task_id = _two_tasks_cancelled(front, market, flow)
        # Tried once: then each of them on its own, every time.
        assert front.methods.count((*PRICED, NONCE)) == 1
        assert front.methods.count("eth_estimateGas") == 2
        assert front.methods.count("eth_maxPriorityFeePerGas") == 2
        with pytest.raises(InvalidTaskStateError):
            fronted.cancel_task(sender=flow.accounts.buyer, task_id=task_id)
        del front.methods[:]
        task, position = fronted.at_once(
            lambda: fronted.task(task_id=task_id),
            lambda: fronted.trainer_position(task_id=task_id, device=flow.accounts.buyer.address),
        )
        assert (task.state, position) == (TaskState.CANCELLED, None)
        assert front.methods == ["eth_call", "eth_call"]


def test_a_node_without_the_tip_method_is_priced_from_its_fee_history(
    chain_node, market: FlexMarket, flow: Flow
):
    with _serving(_WithoutTipMethod, node_url=chain_node.rpc_url) as front:
        _two_tasks_cancelled(front, market, flow)
    assert front.methods.count((*PRICED, NONCE)) == 2
    assert "eth_feeHistory" in front.methods


def test_views_asked_at_once_answer_as_each_does_alone(chain_node, market: FlexMarket, flow: Flow):
    task_id = flow.create_task()
    device = flow.accounts.spare[0].address
    with _serving(_Forwarding, node_url=chain_node.rpc_url) as front:
        fronted = FlexMarket(
            w3=client(f"http://127.0.0.1:{front.server_port}"), address=market.address
        )
        views = (
            lambda: fronted.task(task_id=task_id),
            lambda: fronted.round_info(task_id=task_id, round_number=0),
            lambda: fronted.trainer_position(task_id=task_id, device=device),
        )
        together = fronted.at_once(*views)
        assert front.methods == [("eth_call",) * 3]
        assert together == [view() for view in views]
        assert together[0].state == TaskState.BIDDING
        assert together[2] is None
        # An error is the one its view raises alone.
        with pytest.raises(UnknownTaskError):
            fronted.at_once(views[1], lambda: fronted.task(task_id=task_id + 100))


def test_a_rounds_selection_and_opening_are_read_in_one_request_then_its_updates(
    chain_node, market: FlexMarket, flow: Flow
):
    """What an aggregation and each trainer's check read of a round, every round: the
    selection and the block the round opened in together, then that round's updates."""
    running = flow.start()
    flow.run_round(running, 0)
    task_id = running.task_id
    with _serving(_Forwarding, node_url=chain_node.rpc_url) as front:
        fronted = FlexMarket(
            w3=client(f"http://127.0.0.1:{front.server_port}"), address=market.address
        )
        task, info = (
            fronted.task(task_id=task_id),
            fronted.round_info(task_id=task_id, round_number=0),
        )
        del front.methods[:]
        selection, opened = fronted.round_opening(
            task_id=task_id, task=task, global_id=info.global_model
        )
        updates = fronted.updates_of(task_id=task_id, round_number=0, opened=opened)
        assert front.methods == [("eth_call", "eth_call"), "eth_getLogs"]
    assert selection == market.selection(task_id=task_id)
    assert opened == market.model_origin(model_id=info.global_model)
    assert updates == market.updates_of(task_id=task_id, round_number=0)
    assert set(updates) == {t.address for t in running.trainers}
    # A task still bidding has no selection, and an ID never used no origin: None for each.
    bidding = flow.create_task()
    assert market.round_opening(
        task_id=bidding, task=market.task(task_id=bidding), global_id="0x" + "ab" * 32
    ) == (None, None)


def test_a_view_in_another_thread_is_answered_while_a_batch_is_collected(
    market: FlexMarket, flow: Flow
):
    """The web server's threads share one client: a batch one thread is collecting does
    not turn another thread's view into a request of that batch."""
    task_id = flow.create_task()
    collecting, answered = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def alone() -> None:
        collecting.wait()
        try:
            seen["task"] = market.task(task_id=task_id)
        finally:
            answered.set()

    def in_the_batch():
        collecting.set()
        answered.wait()  # the other thread's view, asked while this batch is open
        return market.task(task_id=task_id)

    other = threading.Thread(target=alone)
    other.start()
    together = market.at_once(
        in_the_batch, lambda: market.round_info(task_id=task_id, round_number=0)
    )
    other.join()
    assert seen["task"] == together[0]
    assert seen["task"].state == TaskState.BIDDING


def test_a_node_without_the_one_request_send_is_sent_the_plain_way(
    chain_node, market: FlexMarket, flow: Flow
):
    with _serving(_WithoutSendSync, node_url=chain_node.rpc_url) as front:
        _two_tasks_cancelled(front, market, flow)
        # Asked once: then the plain send, and the receipt asked for, every time.
        assert front.methods.count("eth_sendRawTransactionSync") == 1
        assert front.methods.count("eth_sendRawTransaction") == 2
        assert front.methods.count("eth_getTransactionReceipt") >= 2


def test_a_transaction_the_node_took_but_saw_no_block_for_is_waited_for_once(
    chain_node, market: FlexMarket, flow: Flow, w3: Web3
):
    """The node's wait ran out: the transaction is in its pool, so it is waited for as
    sent, not sent again under the next nonce (which would cancel the task twice, or pay
    twice)."""
    task_id = flow.create_task()
    buyer = flow.accounts.buyer.address
    nonce = w3.eth.get_transaction_count(buyer)
    with _serving(_SendSyncTimingOut, node_url=chain_node.rpc_url) as front:
        fronted = FlexMarket(
            w3=client(f"http://127.0.0.1:{front.server_port}"), address=market.address
        )
        result = fronted.cancel_task(sender=flow.accounts.buyer, task_id=task_id)
    assert result.gas_used > 0
    assert front.methods.count("eth_sendRawTransactionSync") == 1
    assert "eth_getTransactionReceipt" in front.methods
    assert w3.eth.get_transaction_count(buyer) == nonce + 1
    assert market.task(task_id=task_id).state == TaskState.CANCELLED


class _SendSyncHangingUp(_Forwarding):
    """A node (or the network in front of it) that takes the transaction and hangs up
    before its answer is back."""

    def answer(self, request: dict, body: bytes) -> bytes:
        if request["method"] == "eth_sendRawTransactionSync":
            self.forward(json.dumps({**request, "method": "eth_sendRawTransaction"}).encode())
            raise ConnectionAbortedError("hung up")
        return self.forward(body)

    def do_POST(self) -> None:
        with contextlib.suppress(ConnectionAbortedError):
            super().do_POST()
        self.close_connection = True


def test_a_transaction_whose_sending_lost_its_answer_is_not_sent_twice(
    chain_node, accounts: Accounts, w3: Web3
):
    # A payment (a withdrawal, say) whose answer was lost: sending it again would pay twice.
    payee = Account.create().address
    sender = accounts.spare[0]
    nonce = w3.eth.get_transaction_count(sender.address)
    with _serving(_SendSyncHangingUp, node_url=chain_node.rpc_url) as front:
        fronted = client(f"http://127.0.0.1:{front.server_port}")
        receipt = submit(fronted, sender, {"to": payee, "value": 9}, wait=True).receipt()
    assert receipt["status"] == 1
    assert front.methods.count("eth_sendRawTransactionSync") == 1
    assert w3.eth.get_balance(payee) == 9
    assert w3.eth.get_transaction_count(sender.address) == nonce + 1


def test_a_market_address_with_no_contract_is_named_not_misread(
    market: FlexMarket, accounts: Accounts
):
    # A config naming another chain's market, or an account: every read says so.
    nothing = FlexMarket(w3=market.w3, address=accounts.buyer.address)
    with pytest.raises(NoContractError) as exc:
        nothing.task_count()
    assert exc.value.code == "no_contract"
    assert exc.value.fields["address"] == accounts.buyer.address
    with pytest.raises(NoContractError):
        nothing.task(task_id=1)


def test_view_reverts_are_typed(market: FlexMarket):
    with pytest.raises(UnknownTaskError) as exc:
        market.bids(task_id=5)
    assert exc.value.task_id == 5


def test_tx_result_events(market: FlexMarket, flow: Flow):
    task_id = flow.create_task()
    result = market.cancel_task(sender=flow.accounts.buyer, task_id=task_id)
    assert result.gas_used > 0
    assert result.fee_wei == result.gas_used * result.effective_gas_price_wei
    with pytest.raises(LookupError):
        result.first(TaskCreated)
    assert result.all(TaskCreated) == []


def test_sender_without_funds_is_rejected_typed(
    market: FlexMarket, accounts: Accounts, flow: Flow, w3: Web3
):
    broke = Account.create()
    market.register_device(
        sender=accounts.owner,
        device=broke.address,
        device_class=DeviceClass.CPU,
        can_aggregate=False,
    )
    task_id = flow.create_task()
    with pytest.raises(TransactionRejectedError) as exc:
        flow.bid_trainer(task_id, broke, 10**9)
    assert exc.value.code == "transaction_rejected"
    assert exc.value.sender == broke.address
    assert w3.eth.get_transaction_count(broke.address) == 0


SENDER_SCRIPT = """
import contextlib, fcntl, sys
from eth_account import Account
from eth_account.signers.local import LocalAccount
from chain.node import client, connect
from chain.transactions import transfer_eth
w3, key, lock_path = connect(sys.argv[1]), sys.argv[2], sys.argv[3]

@contextlib.contextmanager
def shared_lock():
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield

for to in sys.argv[4:]:
    transfer_eth(w3=w3, sender=Account.from_key(key), to=to, value_wei=1, sending=shared_lock())
"""


def test_processes_sharing_a_lock_for_one_key_all_get_their_transactions_in(
    market: FlexMarket, accounts: Accounts, w3: Web3, tmp_path
):
    # As the web server's worker processes all fund new devices from the one faucet key:
    # the lock they share is held only while a nonce is taken and its transaction sent.
    sender = accounts.spare[0]
    payees = [[Account.create().address for _ in range(8)] for _ in range(3)]
    url = str(w3.provider.endpoint_uri)
    key = "0x" + bytes(sender.key).hex()
    lock = str(tmp_path / "nonce.lock")
    procs = [
        subprocess.Popen([sys.executable, "-c", SENDER_SCRIPT, url, key, lock, *batch], cwd=ROOT)
        for batch in payees
    ]

    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    assert all(w3.eth.get_balance(a) == 1 for batch in payees for a in batch)


class _Twin:
    """The same key in another process, which read the same pending nonce, signed the same
    call with the same fees and sent it a moment before this one could."""

    def __init__(self, account: LocalAccount, w3: Web3) -> None:
        self.account, self.w3, self.sent = account, w3, []

    @property
    def address(self) -> str:
        return self.account.address

    def sign_transaction(self, tx: dict):
        signed = self.account.sign_transaction(tx)
        if not self.sent:
            self.sent.append(self.w3.eth.send_raw_transaction(signed.raw_transaction))
        return signed


@pytest.mark.parametrize("wait", [False, True], ids=["sent", "sent-and-waited-for"])
@pytest.mark.parametrize("mined", [True, False], ids=["mined", "in-the-pool"])
def test_the_same_transaction_sent_first_by_another_process_runs_once(
    accounts: Accounts, w3: Web3, mined: bool, wait: bool
):
    # Two deliveries of one piece of work, run side by side by two processes of one device,
    # build the same call: whichever reaches the node second waits for the first one's
    # transaction instead of failing, or of sending the call again under the next nonce.
    twin = _Twin(accounts.spare[1], w3)
    payee = Account.create().address
    nonce = w3.eth.get_transaction_count(twin.address)
    w3.provider.make_request("evm_setAutomine", [mined])
    try:
        pending = submit(w3, twin, {"to": payee, "value": 7}, wait=wait)  # type: ignore[arg-type]
    finally:
        w3.provider.make_request("evm_setAutomine", [True])
    if not mined:
        w3.provider.make_request("evm_mine", [])
    assert pending.tx_hash == twin.sent[0]
    assert pending.receipt()["status"] == 1
    assert w3.eth.get_balance(payee) == 7
    assert w3.eth.get_transaction_count(twin.address) == nonce + 1


def test_a_transaction_is_waited_for_until_mined_and_no_longer_than_asked(
    accounts: Accounts, w3: Web3
):
    payee = Account.create().address
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        pending = submit(w3, accounts.spare[0], {"to": payee, "value": 5})
        # Not mined yet: the wait gives up when told to, and names the transaction.
        with pytest.raises(ChainUnavailableError, match="not mined in time") as exc:
            pending.receipt(timeout=0.3)
        assert exc.value.tx_hash == "0x" + bytes(pending.tx_hash).hex()
        assert exc.value.code == "chain_unavailable"
        # Mined while a wait is on: that wait returns the receipt.
        with ThreadPoolExecutor(max_workers=1) as pool:
            waiting = pool.submit(pending.receipt, timeout=120)
            w3.provider.make_request("evm_mine", [])
            receipt = waiting.result()
    finally:
        w3.provider.make_request("evm_setAutomine", [True])
        w3.provider.make_request("evm_mine", [])
    assert receipt["status"] == 1
    assert bytes(receipt["transactionHash"]) == bytes(pending.tx_hash)
    assert w3.eth.get_balance(payee) == 5


def test_a_node_lost_while_a_receipt_is_awaited_is_chain_unavailable(accounts: Accounts, w3: Web3):
    pending = submit(w3, accounts.spare[0], {"to": Account.create().address, "value": 1})
    pending.receipt()
    # The same wait, against a node that has gone away: a clear error at once, not a hang
    # until the receipt timeout.
    lost = PendingTx(
        w3=client(f"http://127.0.0.1:{free_port()}", timeout=2),
        tx=pending.tx,
        tx_hash=pending.tx_hash,
    )
    with pytest.raises(ChainUnavailableError, match="cannot reach the chain") as exc:
        lost.receipt(timeout=120)
    assert exc.value.code == "chain_unavailable"


def _ask_the_node(url: str, times: int) -> None:
    w3 = connect(url)
    for _ in range(times):
        assert w3.eth.block_number >= 0


def test_a_forked_process_and_its_parent_ask_the_node_side_by_side(chain_node):
    """A Celery pool process is forked from a worker that already talks to the node: each
    must have connections of its own, or their requests garble each other's on one socket."""
    url = chain_node.rpc_url
    _ask_the_node(url, 1)  # the parent holds an open connection to the node now
    fork = multiprocessing.get_context("fork")
    children = [fork.Process(target=_ask_the_node, args=(url, 300)) for _ in range(2)]
    for child in children:
        child.start()
    _ask_the_node(url, 300)
    for child in children:
        child.join()
    assert [child.exitcode for child in children] == [0, 0]
