"""The Ethereum node as FLEX reaches it: one way to connect, to read its clock and fees, and
to turn a lost node into ChainUnavailableError."""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from collections.abc import Iterator

import requests
from requests.adapters import HTTPAdapter
from requests.utils import get_environ_proxies
from web3 import Web3
from web3.exceptions import ProviderConnectionError

from chain.errors import ChainUnavailableError

DEFAULT_TIMEOUT_S = 30.0
# Connections kept open to the node, shared by the threads of a process.
SESSION_POOL_SIZE = 32
# What a lost, refusing or stalled node raises from web3's HTTP provider.
UNREACHABLE = (requests.RequestException, ProviderConnectionError, OSError)


@functools.cache
def connect(url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> Web3:
    """A Web3 client of the JSON-RPC node at ``url`` (one per URL and timeout, per process).

    Without web3's validation middleware: it asks the node its chain id before every call
    and estimate (once per thread, and a web server runs each request in a thread of its
    own) to compare it with the chainId of a transaction, which FLEX sets from chain_id.
    """
    w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": timeout}, session=_session(url)))
    w3.middleware_onion.remove("validation")
    return w3


def _session(url: str) -> requests.Session:
    """One HTTP session for every thread (web3 makes one per thread otherwise: a new
    connection for each request a web server runs), with the environment's proxies and CA
    bundle read once, not before every request (requests scans the whole environment then)."""
    session = requests.Session()
    session.proxies = get_environ_proxies(url)
    session.verify = (
        os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    )
    session.trust_env = False
    _pool_new(session)
    _SESSIONS.add(session)
    return session


def _pool_new(session: requests.Session) -> None:
    adapter = HTTPAdapter(pool_maxsize=SESSION_POOL_SIZE)
    session.mount("http://", adapter)
    session.mount("https://", adapter)


# Every session made in this process, so that a forked child drops their connections.
_SESSIONS: weakref.WeakSet[requests.Session] = weakref.WeakSet()


def _drop_inherited_connections() -> None:
    """In a forked child (a Celery pool process): the sessions' open connections are its
    parent's sockets too, and two processes writing one socket garble each other's requests
    (the node answers "Invalid request" or hangs up). The child gets pools of its own; the
    inherited ones are left untouched (a lock a parent's thread held at the fork would stay
    held in the child)."""
    for session in list(_SESSIONS):
        _pool_new(session)


os.register_at_fork(after_in_child=_drop_inherited_connections)


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


def max_fee_per_gas(w3: Web3, *, tip_wei: int | None = None) -> int:
    """The fee cap per gas FLEX signs with: twice the latest base fee plus the node's tip (or
    ``tip_wei``, when already asked), so a transaction stays includable through a few blocks
    of rising fees."""
    with reachable():
        base_fee = w3.eth.get_block("latest").get("baseFeePerGas", 0)
        return 2 * base_fee + (w3.eth.max_priority_fee if tip_wei is None else tip_wei)
