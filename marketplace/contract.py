"""The platform's handle on the chain: the node, the deployed FlexMarket and its own accounts."""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
from django.conf import settings
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from chain.client import FlexMarket
from chain.errors import ChainUnavailableError
from chain.launcher import dev_accounts
from chain.node import chain_id as node_chain_id
from chain.node import chain_time, connect, reachable
from chain.transactions import transfer_eth
from core import messages
from core.errors import FlexError
from marketplace.errors import ContractNotDeployedError

# Gas a device spends over a typical task (bids, updates, withdrawals), for the join reply.
DEVICE_GAS_BUDGET = 2_000_000
# A platform transaction normally takes a block; the lock outlives a slow one.
PLATFORM_LOCK_TTL_S = 300
PLATFORM_LOCK_WAIT_S = 30


class PlatformBusyError(FlexError):
    """Another platform transaction is in flight; try again shortly."""

    code = "platform_busy"


@dataclass(frozen=True)
class Deployment:
    chain_id: int
    address: str
    block: int


def w3() -> Web3:
    return connect(settings.ETH_RPC_URL)


def chain_id() -> int:
    return node_chain_id(w3())


def chain_clock_offset() -> float:
    """Seconds the chain's clock is ahead of this host's: 0 on a chain that keeps time, more on
    a dev chain moved by evm_increaseTime; 0 when the chain cannot be read (a guess beats no
    page)."""
    try:
        offset = chain_time(w3()) - time.time()
    except ChainUnavailableError:
        return 0.0
    # Block times are whole seconds: only a shift beyond their rounding counts.
    return offset if abs(offset) > 2 else 0.0


def on_dev_chain() -> bool:
    """Whether dev-chain behaviour is on (FLEX_DEV_CHAIN): set explicitly, never guessed from
    the chain id, since anyone can run a chain with Anvil's id and keys."""
    return settings.FLEX_DEV_CHAIN


# Every chain read and every message of the platform names the contract: a recorded
# deployment, once its code is confirmed on the chain, is kept for this long (a changed
# record is confirmed again at once). Reading the code back, some 24 kB, on each use cost
# more than most of the reads it was for.
DEPLOYMENT_CONFIRMED_S = 30.0
_confirmed: dict[tuple[str, int], float] = {}


def deployment_load(path: Path | None = None) -> Deployment | None:
    """The recorded deployment for the chain we are connected to, if its code is there."""
    path = path or Path(settings.FLEX_DEPLOYMENT_FILE)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    record, key = Deployment(**json.loads(text)), (text, chain_id())
    confirmed = _confirmed.get(key)
    if confirmed is not None and time.monotonic() - confirmed < DEPLOYMENT_CONFIRMED_S:
        return record
    with reachable():
        if record.chain_id != key[1] or not w3().eth.get_code(record.address):
            return None
    _confirmed[key] = time.monotonic()
    return record


def deployment_save(record: Deployment, path: Path | None = None) -> Path:
    path = path or Path(settings.FLEX_DEPLOYMENT_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(record), indent=2) + "\n")
    return path


def address() -> str:
    if settings.FLEX_CONTRACT_ADDRESS:
        return settings.FLEX_CONTRACT_ADDRESS
    record = deployment_load()
    if record is None:
        raise ContractNotDeployedError(
            "No FlexMarket contract is deployed on this chain: run `manage.py deploy_contract` "
            "or set FLEX_CONTRACT_ADDRESS.",
            rpc_url=settings.ETH_RPC_URL,
        )
    return record.address


def deployment_identity() -> messages.Deployment:
    """The deployment every message of this platform names: chain id and contract address."""
    return messages.Deployment(chain_id=chain_id(), contract=address())


def market() -> FlexMarket:
    return _market(settings.ETH_RPC_URL, address())


@functools.cache
def _market(rpc_url: str, address: str) -> FlexMarket:
    # One client per node and contract: building one decodes the whole ABI (some 40 ms).
    return FlexMarket(w3=connect(rpc_url), address=address)


def registrar() -> LocalAccount:
    """The account that registers devices: FLEX_REGISTRAR_KEY, or dev account 0 on the dev
    chain."""
    if settings.FLEX_REGISTRAR_KEY:
        return Account.from_key(settings.FLEX_REGISTRAR_KEY)
    if not on_dev_chain():
        raise ContractNotDeployedError("FLEX_REGISTRAR_KEY is not set, and FLEX_DEV_CHAIN is off.")
    return dev_accounts(1)[0]


@functools.cache
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


@contextlib.contextmanager
def platform_account_lock(*, wait_s: float | None = None) -> Iterator[LocalAccount]:
    """The platform (registrar) account, held by one sender at a time across processes, so
    that two platform transactions never race for one nonce. PlatformBusyError after
    ``wait_s`` (PLATFORM_LOCK_WAIT_S)."""
    account = registrar()
    with _account_lock(account, wait_s=PLATFORM_LOCK_WAIT_S if wait_s is None else wait_s):
        yield account


@contextlib.contextmanager
def _account_lock(account: LocalAccount, *, wait_s: float) -> Iterator[None]:
    """One sender at a time across the platform's processes for ``account``'s nonce on its
    chain node: stacks that share a Redis but not a chain (each local stack, bench and test
    worker has its own node, all with the same dev accounts) never wait on each other."""
    lock = _redis(settings.REDIS_URL).lock(
        f"flex:platform-tx:{settings.ETH_RPC_URL}:{account.address}",
        timeout=PLATFORM_LOCK_TTL_S,
        blocking_timeout=wait_s,
    )
    if not lock.acquire():
        raise PlatformBusyError(account=account.address)
    try:
        yield
    finally:
        with contextlib.suppress(redis.exceptions.LockError):
            lock.release()


def faucet() -> LocalAccount:
    """The dev chain's funding account (dev account 1); there is no faucet elsewhere."""
    return dev_accounts(1, start=1)[0]


def gas_needed_wei() -> int:
    return DEVICE_GAS_BUDGET * w3().eth.gas_price


def fund_gas_on_dev_chain(*, address: str) -> int:
    """Send a new device ETH for its gas on the dev chain; elsewhere its owner funds it."""
    if not on_dev_chain():
        return 0
    amount = settings.FLEX_DEV_DEVICE_FUNDING_WEI
    faucet_transfer(to=address, value_wei=amount)
    return amount


def faucet_transfer(*, to: str, value_wei: int) -> str:
    """Sends dev-chain ETH from the faucet; returns the tx hash. The web server's processes
    all send from the faucet: they take its nonce one at a time."""
    account = faucet()
    return transfer_eth(
        w3=w3(),
        sender=account,
        to=to,
        value_wei=value_wei,
        sending=_account_lock(account, wait_s=PLATFORM_LOCK_WAIT_S),
    )
