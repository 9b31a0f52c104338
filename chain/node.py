"""The Ethereum node as FLEX reaches it: one way to connect, to read its clock and fees, and
to turn a lost node into ChainUnavailableError."""

from __future__ import annotations

import contextlib
import functools
import os
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import certifi
import requests
import urllib3
from web3 import HTTPProvider, Web3
from web3._utils.method_formatters import get_result_formatters
from web3._utils.rpc_abi import RPC
from web3.exceptions import ProviderConnectionError, Web3RPCError
from web3.method import Method, default_root_munger
from web3.providers.rpc.utils import ExceptionRetryConfiguration, check_if_retry_on_failure
from web3.types import RPCEndpoint, RPCResponse

from chain.errors import ChainUnavailableError
from core.proxies import proxy_manager

DEFAULT_TIMEOUT_S = 30.0
# EIP-7966: a signed transaction sent and answered with its receipt once mined (Anvil, geth
# 1.16.6+, Erigon 3.4+), instead of its hash and a receipt asked for until it is mined.
SEND_SYNC = RPCEndpoint("eth_sendRawTransactionSync")
# Connections kept open to the node, shared by the threads of a process.
SESSION_POOL_SIZE = 32
# What a lost, refusing or stalled node raises from a web3 HTTP provider (NodeProvider's or
# web3's own).
UNREACHABLE = (
    urllib3.exceptions.HTTPError,
    requests.RequestException,
    ProviderConnectionError,
    OSError,
)


class NodeStatusError(ProviderConnectionError):
    """The node (or a proxy in front of it) answered with an HTTP error status."""


# What the provider tries again, as web3's own HTTP provider does, for the calls web3 deems
# safe to repeat: a connection refused or reset, a timeout, an error status.
RETRIED = (urllib3.exceptions.HTTPError, ConnectionError, NodeStatusError)


class NodeProvider(HTTPProvider):
    """web3's HTTP provider, with its encoding, retries and error handling, over a urllib3
    connection pool instead of a requests session: most of the CPU of a small JSON-RPC call
    is the HTTP client's, and requests costs about three times what urllib3 under it does.

    One pool for every thread of the process. A forked child (a Celery pool process) gets a
    pool of its own: the inherited connections are its parent's sockets too, and two
    processes writing one socket garble each other's requests (the node answers "Invalid
    request" or hangs up). The environment's proxy and CA bundle are read once, as requests
    would read them before every request."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__(
            url,
            request_kwargs={"timeout": timeout},
            exception_retry_configuration=ExceptionRetryConfiguration(errors=RETRIED),
        )
        # web3's provider sends every request and batch through its session manager's
        # make_post_request: this provider is its own.
        self._request_session_manager = self  # type: ignore[assignment]
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)
        self._path = urllib3.util.parse_url(str(self.endpoint_uri)).request_uri
        self._pool = self._new_pool()
        _PROVIDERS.add(self)

    def _new_pool(self) -> urllib3.PoolManager | urllib3.HTTPConnectionPool:
        """The connections to the node: a pool of its host's own (the provider only ever
        posts to its endpoint, so nothing is looked up per request), or, through a proxy
        the environment names, the proxy's."""
        url = str(self.endpoint_uri)
        options = {
            "maxsize": SESSION_POOL_SIZE,
            "retries": False,
            "ca_certs": os.environ.get("REQUESTS_CA_BUNDLE")
            or os.environ.get("CURL_CA_BUNDLE")
            or certifi.where(),
        }
        proxied = proxy_manager(url, **options)
        if proxied is not None:
            return proxied
        if urllib3.util.parse_url(url).scheme != "https":
            del options["ca_certs"]
        return urllib3.connection_from_url(url, **options)

    def make_batch_request(
        self, batch_requests: list[tuple[RPCEndpoint, Any]]
    ) -> list[RPCResponse] | RPCResponse:
        """web3's batch (at_once), tried again as web3 tries a single request when every
        request in it is one web3 deems safe to repeat (reads, estimates: what FLEX batches).
        web3 sends a batch once, whatever went wrong."""
        retry = self.exception_retry_configuration
        methods = [method for method, _ in batch_requests]
        if retry is None or not all(
            check_if_retry_on_failure(m, retry.method_allowlist) for m in methods
        ):
            return super().make_batch_request(batch_requests)
        for attempt in range(retry.retries):
            try:
                return super().make_batch_request(batch_requests)
            except tuple(retry.errors):
                if attempt == retry.retries - 1:
                    raise
                time.sleep(retry.backoff_factor * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def make_post_request(self, endpoint_uri: str, data: bytes, **kwargs: object) -> bytes:
        """The node's answer to ``data`` (web3 calls this for each request and batch)."""
        pool = self._pool
        response = pool.urlopen(
            "POST",
            endpoint_uri if isinstance(pool, urllib3.PoolManager) else self._path,
            body=data,
            headers=kwargs.get("headers"),  # type: ignore[arg-type]
            timeout=self._timeout,
        )
        if response.status >= 400:
            raise NodeStatusError(f"{endpoint_uri} answered HTTP {response.status}")
        return response.data


def client(url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> Web3:
    """A Web3 client of the JSON-RPC node at ``url`` of its own (connect() shares one).

    Without web3's validation middleware: it asks the node its chain id before every call
    and estimate (once per thread, and a web server runs each request in a thread of its
    own) to compare it with the chainId of a transaction, which FLEX sets from chain_id.
    Without its ENS middleware either: FLEX names accounts and contracts by address only,
    and that middleware looks through the arguments of every request for names.

    With ``eth.send_raw_transaction_sync`` (SEND_SYNC), whose answer web3 formats as it
    does a receipt (chain.transactions uses it where the node has it).
    """
    w3 = Web3(NodeProvider(url, timeout=timeout))
    w3.middleware_onion.remove("validation")
    w3.middleware_onion.remove("ens_name_to_address")
    w3.eth.attach_methods(
        {
            "send_raw_transaction_sync": Method(
                SEND_SYNC,
                mungers=[default_root_munger],
                result_formatters=lambda _method, module: get_result_formatters(
                    RPC.eth_getTransactionReceipt, module
                ),
            )
        }
    )
    return w3


@functools.cache
def connect(url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> Web3:
    """The process's Web3 client of the JSON-RPC node at ``url`` (one per URL and timeout)."""
    return client(url, timeout=timeout)


# Every provider made in this process, so that a forked child drops their connections.
_PROVIDERS: weakref.WeakSet[NodeProvider] = weakref.WeakSet()


def _drop_inherited_connections() -> None:
    """In a forked child, new pools for every provider; the inherited ones are left
    untouched (a lock a parent's thread held at the fork would stay held in the child)."""
    for provider in list(_PROVIDERS):
        provider._pool = provider._new_pool()


os.register_at_fork(after_in_child=_drop_inherited_connections)


# The nodes (by URL) this process found refusing JSON-RPC batches.
_BATCH_REFUSED: set[str] = set()


def at_once(w3: Web3, *reads: Callable[[], Any]) -> list[Any]:
    """The answers of ``reads``, asked of the node in one JSON-RPC batch. Each read asks
    the node one thing: a web3 method (``lambda: w3.eth.get_block("latest")``) or a view of
    chain.client.FlexMarket, which inside the batch give their request instead of asking.

    One request instead of one each: each costs both sides more than the node takes to
    answer it. An answer, or an error, is the one its read gives alone. A node that refuses
    batches is asked one read at a time, from then on; one without a method of the batch,
    this time, as web3 asks them alone (its tip, say, then from the fee history)."""
    url = str(w3.provider.endpoint_uri)  # type: ignore[attr-defined]
    if url not in _BATCH_REFUSED:
        try:
            with w3.batch_requests() as batch:
                for read in reads:
                    batch.add(read())
                return batch.execute()
        except Web3RPCError as exc:
            if _refused_whole(exc):
                _BATCH_REFUSED.add(url)
            elif not method_missing(exc):
                raise
    return [read() for read in reads]


def batching(w3: Web3) -> bool:
    """Whether ``w3`` is collecting an at_once batch: a read then gives its request."""
    return w3.provider._is_batching  # type: ignore[attr-defined]


def method_missing(exc: Exception) -> bool:
    """Whether the node answered that it has no such method (JSON-RPC's -32601)."""
    error = (getattr(exc, "rpc_response", None) or {}).get("error")
    return isinstance(error, dict) and error.get("code") == -32601


def _refused_whole(exc: Web3RPCError) -> bool:
    """Whether the node answered a batch with one error for the whole of it (JSON-RPC 2.0:
    an error that names no request), not an error of one of its requests."""
    response = getattr(exc, "rpc_response", None)
    return isinstance(response, dict) and response.get("id") is None


def chain_id(w3: Web3) -> int:
    """The node's chain id, asked once per URL and process: a node never changes it."""
    return _chain_id_of(str(w3.provider.endpoint_uri))  # type: ignore[attr-defined]


@functools.cache
def _chain_id_of(url: str) -> int:
    with reachable():
        return connect(url).eth.chain_id


@contextlib.contextmanager
def reachable() -> Iterator[None]:
    """Raises ChainUnavailableError for a node that cannot be reached or does not answer."""
    try:
        yield
    except UNREACHABLE as exc:
        raise ChainUnavailableError(f"cannot reach the chain: {exc}") from exc


def chain_time(w3: Web3) -> int:
    """Unix time as the next block will carry it, which on-chain deadlines are checked
    against (the latest block's can lag far behind on a chain that mines on demand)."""
    with reachable():
        return int(w3.eth.get_block("pending")["timestamp"])


def fee_cap(*, base_fee_wei: int, tip_wei: int) -> int:
    """The fee cap per gas FLEX signs with: twice the base fee plus the tip, so a
    transaction stays includable through a few blocks of rising fees."""
    return 2 * base_fee_wei + tip_wei


def max_fee_per_gas(w3: Web3) -> int:
    """The fee cap (fee_cap) at the latest block's base fee and the node's tip."""
    with reachable():
        base_fee = w3.eth.get_block("latest").get("baseFeePerGas", 0)
        return fee_cap(base_fee_wei=base_fee, tip_wei=w3.eth.max_priority_fee)
