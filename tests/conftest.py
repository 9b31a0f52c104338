"""Fixtures shared by every test: a real local Ethereum node for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from web3 import Web3

from chain.client import FlexMarket
from chain.launcher import LocalChain, dev_accounts

MIN_PRICE_WEI = 10**14


@pytest.fixture(scope="session")
def chain_node() -> Iterator[LocalChain]:
    with LocalChain(accounts=20) as node:
        yield node


@pytest.fixture(scope="session")
def w3(chain_node: LocalChain) -> Web3:
    return chain_node.w3()


@pytest.fixture(scope="session")
def platform_market(chain_node: LocalChain) -> FlexMarket:
    """A FlexMarket deployed once for the session by dev account 0, the platform's registrar."""
    return FlexMarket.deploy(
        w3=chain_node.w3(),
        sender=dev_accounts(1)[0],
        min_trainer_price_wei=MIN_PRICE_WEI,
        min_aggregator_price_wei=MIN_PRICE_WEI,
    )


@pytest.fixture
def platform_settings(settings, chain_node, platform_market, tmp_path):
    """Django settings pointing at the session's chain and contract, dev-chain behaviour on
    (Anvil's keys, the faucet, device funding, private data-plane addresses)."""
    settings.FLEX_DEV_CHAIN = True
    settings.FLEX_DATAPLANE_ALLOW_PRIVATE = True
    settings.ETH_RPC_URL = chain_node.rpc_url
    # Throttle counters and nonces in a Redis database of their own, empty for each test.
    base = settings.REDIS_URL.rsplit("/", 1)[0]
    settings.CACHES = {"default": {**settings.CACHES["default"], "LOCATION": f"{base}/11"}}
    from django.core.cache import cache

    cache.clear()
    settings.FLEX_CONTRACT_ADDRESS = platform_market.address
    settings.FLEX_DEPLOYMENT_FILE = tmp_path / "deployment.json"
    return settings
