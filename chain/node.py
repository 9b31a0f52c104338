"""The Ethereum node as FLEX reaches it: one way to connect, to read its clock and fees, and
to turn a lost node into ChainUnavailableError."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import requests
from web3 import Web3
from web3.exceptions import ProviderConnectionError

from chain.errors import ChainUnavailableError

DEFAULT_TIMEOUT_S = 30.0
# What a lost, refusing or stalled node raises from web3's HTTP provider.
UNREACHABLE = (requests.RequestException, ProviderConnectionError, OSError)


@functools.cache
def connect(url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> Web3:
    """A Web3 client of the JSON-RPC node at ``url`` (one per URL and timeout, per process).

    The node's chain id is asked once (web3 checks it before every estimate and send: three
    requests a transaction otherwise); a node never changes it.
    """
    return Web3(
        Web3.HTTPProvider(
            url,
            request_kwargs={"timeout": timeout},
            cache_allowed_requests=True,
            cacheable_requests={"eth_chainId"},
        )
    )


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
