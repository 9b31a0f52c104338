"""Fixtures shared by every test: a real local Ethereum node for the whole session, and a
broker vhost of the session's own on the real RabbitMQ."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from web3 import Web3

from chain.client import FlexMarket
from chain.launcher import LocalChain, dev_accounts
from core.broker import DEFAULT_BROKER_API_URL, BrokerAdmin, new_vhost_name, url_with
from core.queues import DEFAULT_BROKER_URL

MIN_PRICE_WEI = 10**14
# Redis databases 11 to 14, one per test worker, hold the tests' caches (README).
CACHE_DB = 11
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one test worker per CPU this may run on, within MAX_WORKERS. Each has its
    own chain node, test database and broker vhost."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


def pytest_collection_modifyitems(config, items) -> None:
    """The slow tests first (the test workers take one test at a time: pyproject.toml), so
    they start side by side at once and the many short ones fill in around them, instead
    of one worker ending the run alone on a long one."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def chain_node() -> Iterator[LocalChain]:
    with LocalChain(accounts=20) as node:
        yield node


@pytest.fixture(scope="session")
def w3(chain_node: LocalChain) -> Web3:
    return chain_node.w3()


@pytest.fixture
def chain_rewound(w3) -> Iterator[None]:
    """The session's chain put back as it was after the test: its state, and its clock, which
    a test that mines past a deadline moves ahead of the wall clock (later tests order tasks
    whose deadlines are wall-clock times)."""
    snapshot = w3.provider.make_request("evm_snapshot", [])["result"]
    yield
    w3.provider.make_request("evm_revert", [snapshot])


@pytest.fixture(scope="session")
def platform_market(chain_node: LocalChain) -> FlexMarket:
    """A FlexMarket deployed once for the session by dev account 0, the platform's registrar."""
    return FlexMarket.deploy(
        w3=chain_node.w3(),
        sender=dev_accounts(1)[0],
        min_trainer_price_wei=MIN_PRICE_WEI,
        min_aggregator_price_wei=MIN_PRICE_WEI,
    )


@dataclass(frozen=True)
class BrokerVhost:
    """A vhost on the real RabbitMQ: the platform's URL into it and the management API."""

    name: str
    url: str
    admin: BrokerAdmin


def broker_vhost_new(label: str) -> BrokerVhost:
    """A fresh vhost (FLEX_BROKER_VHOST_PREFIX, ``label``, a random part); delete it after."""
    prefix = os.environ.get("FLEX_BROKER_VHOST_PREFIX", "flex-") + label + "-"
    admin = BrokerAdmin(os.environ.get("FLEX_BROKER_API_URL", DEFAULT_BROKER_API_URL))
    name = new_vhost_name(prefix)
    admin.sweep_throwaway()
    admin.vhost_create(name, throwaway=True)
    base = os.environ.get("FLEX_BROKER_URL", DEFAULT_BROKER_URL)
    return BrokerVhost(name=name, url=url_with(base, vhost=name), admin=admin)


@pytest.fixture(scope="session", autouse=True)
def broker() -> Iterator[BrokerVhost]:
    """The session's own vhost: what the platform's Celery app sends in a test goes there,
    and device users made by enrolments live and die with it."""
    from flexsite.celery import app

    vhost = broker_vhost_new("test")
    app.conf.broker_url = vhost.url  # before the app's first connection
    yield vhost
    vhost.admin.vhost_delete(vhost.name)


@pytest.fixture
def platform_settings(settings, chain_node, platform_market, broker, tmp_path):
    """Django settings pointing at the session's chain, contract and broker vhost, dev-chain
    behaviour on (Anvil's keys, the faucet, device funding, private data-plane addresses)."""
    settings.FLEX_DEV_CHAIN = True
    settings.FLEX_DATAPLANE_ALLOW_PRIVATE = True
    settings.ETH_RPC_URL = chain_node.rpc_url
    # Throttle counters and nonces in a Redis database of their own (one per test worker),
    # empty for each test.
    base = settings.REDIS_URL.rsplit("/", 1)[0]
    db = CACHE_DB + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    settings.CACHES = {"default": {**settings.CACHES["default"], "LOCATION": f"{base}/{db}"}}
    from django.core.cache import cache

    cache.clear()
    settings.FLEX_CONTRACT_ADDRESS = platform_market.address
    settings.FLEX_DEPLOYMENT_FILE = tmp_path / "deployment.json"
    settings.FLEX_BROKER_URL = broker.url
    settings.FLEX_BROKER_API_URL = broker.admin.api_url
    return settings
