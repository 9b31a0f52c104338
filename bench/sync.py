"""Measure chain sync: events mirrored per second and event-to-browser lag; var/bench/sync.json.

`python -m bench.sync` starts a fresh Anvil, deploys FlexMarket and pre-fills it with about
10,000 events (device registrations, tasks and bids from thousands of senders, sent raw and
mined in batches by an impersonating node: the typed client signs and waits for each
receipt, which would take minutes). It
then mirrors them into a throwaway database (Django's test database: a new PostgreSQL
database beside DATABASE_URL, else a SQLite file under var/bench/) and times it. Lag: with
`sync_chain --watch`'s loop running, a buyer's browser (a Channels WebSocket client through
the real ASGI stack and Redis channel layer) watches a task while devices bid on it; each
lag is from the moment the bid's block is mined to the moment its update reaches the
socket. Push: the bytes that socket receives per round of a task with many rounds
(bench.sync_push). Only 127.0.0.1 is used; figures are indicative (shared, noisy machines).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address

from bench import verdict
from bench.sync_push import buyer_headers, measure_push

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "var" / "bench" / "sync.json"

DEVICES = 5_000
TASKS = 5
BIDS_PER_TASK = 999  # the contract takes at most 1,000 bids per task
LAG_SAMPLES = 50
POLL_S = 0.1  # sync_chain --watch's default
MIN_PRICE_WEI = 10**9
TX_GAS = 300_000
RPC_BATCH = 500
LAG_TIMEOUT_S = 10.0
LAG_TARGET_MS = 1000.0


@dataclass
class Chain:
    url: str
    w3: Any
    market: Any
    chain_id: int

    def rpc(self, calls: list[tuple[str, list]]) -> list[Any]:
        """JSON-RPC calls in batches (one HTTP request per RPC_BATCH calls)."""
        results = []
        for i in range(0, len(calls), RPC_BATCH):
            batch = [
                {"jsonrpc": "2.0", "id": j, "method": m, "params": p}
                for j, (m, p) in enumerate(calls[i : i + RPC_BATCH])
            ]
            answers = requests.post(self.url, json=batch, timeout=120).json()
            for answer in sorted(answers, key=lambda a: a["id"]):
                if "error" in answer:
                    raise RuntimeError(f"{answer['error']}")
                results.append(answer["result"])
        return results

    def call(self, sender: str, nonce: int, function: str, *args: Any, value: int = 0) -> dict:
        """A transaction calling the market from ``sender``, for eth_sendTransaction: the
        bench's node impersonates every account, so thousands of senders need no keys (and
        no signing, which costs milliseconds per transaction in Python)."""
        if not hasattr(self, "_contract"):
            self._contract = self.w3.eth.contract(address=self.market.address, abi=self.market.abi)
        return {
            "from": sender,
            "nonce": hex(nonce),
            "to": self.market.address,
            "data": self._contract.encode_abi(function, args=list(args)),
            "gas": hex(TX_GAS),
            # Full blocks raise the base fee 12.5% a block: a cap far above it keeps every
            # transaction includable until the last batch is mined.
            "maxFeePerGas": hex(10**12),
            "maxPriorityFeePerGas": hex(1),
            "value": hex(value),
        }

    def send_and_mine(self, txs: list[dict]) -> int:
        """Sends every transaction with automine off, then mines blocks until all are in;
        returns how many blocks that took."""
        hashes = self.rpc([("eth_sendTransaction", [tx]) for tx in txs])
        blocks = 0
        while True:
            self.w3.provider.make_request("evm_mine", [])
            blocks += 1
            pool = self.w3.provider.make_request("txpool_status", [])["result"]
            if not int(pool["pending"], 16) + int(pool["queued"], 16):
                break
        receipts = self.rpc([("eth_getTransactionReceipt", [h]) for h in hashes])
        if any(r is None or int(r["status"], 16) != 1 for r in receipts):
            raise RuntimeError("a pre-fill transaction was dropped or reverted")
        return blocks


def prefill(chain: Chain, owner: str, buyer: str) -> dict[str, Any]:
    from chain.events import DeviceClass, Role

    started = time.monotonic()
    devices = [
        to_checksum_address(keccak(text=f"flex-bench-sync-{i}")[:20]) for i in range(DEVICES)
    ]
    chain.w3.provider.make_request("anvil_autoImpersonateAccount", [True])
    chain.rpc([("anvil_setBalance", [d, hex(10**19)]) for d in devices])
    chain.w3.provider.make_request("evm_setAutomine", [False])
    nonce = chain.w3.eth.get_transaction_count(owner)
    blocks = chain.send_and_mine(
        [
            chain.call(owner, nonce + i, "registerDevice", d, int(DeviceClass.CPU), False)
            for i, d in enumerate(devices)
        ]
    )
    now = chain.w3.eth.get_block("latest")["timestamp"]
    nonce = chain.w3.eth.get_transaction_count(buyer)
    blocks += chain.send_and_mine(
        [
            chain.call(
                buyer,
                nonce + i,
                "createTask",
                keccak(text=f"spec-{i}"),
                1,  # rounds
                1,  # min trainers
                10,  # max trainers
                now + 86_400,  # bidding ends
                600,  # round timeout
                (1000, 0, 0, 0),  # sample cap, no dispute window, FedAvg
                value=10**18,
            )
            for i in range(TASKS)
        ]
    )
    first_task = chain.market.task_count() - TASKS + 1
    stake = chain.market.task(task_id=first_task).trainer_stake_wei
    bids = []
    for i in range(TASKS * BIDS_PER_TASK):
        task_id = first_task + i // BIDS_PER_TASK
        price = MIN_PRICE_WEI * (1 + i % 7)
        bids.append(
            chain.call(
                devices[i],
                0,
                "placeBid",
                task_id,
                price,
                100 + i % 50,
                int(Role.TRAINER),
                value=stake,
            )
        )
    blocks += chain.send_and_mine(bids)
    chain.w3.provider.make_request("evm_setAutomine", [True])
    return {
        "devices": devices,
        "first_task": first_task,
        "blocks": blocks,
        "seconds": time.monotonic() - started,
    }


# ---------------------------------------------------------------- Django, apart from real data


def django_setup(var: Path) -> str:
    """Django on a throwaway test database (returns the real one's name); Celery messages in
    a broker vhost of the bench's own (named in ``var``), Channels groups apart from any
    platform running on the same Redis."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flexsite.settings")
    import django

    django.setup()
    from celery import Celery
    from django.conf import settings
    from django.db import connection

    from marketplace import lifecycle
    from stack.backing import stack_vhost

    old_name = connection.settings_dict["NAME"]
    test = connection.settings_dict.setdefault("TEST", {})
    if connection.vendor == "sqlite":
        path = ROOT / "var" / "bench" / "sync.sqlite3"
        path.parent.mkdir(parents=True, exist_ok=True)
        test["NAME"] = str(path)
    else:
        test["NAME"] = f"flex_bench_sync_{os.getpid()}"
    connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    broker = stack_vhost(var, throwaway=True)["FLEX_BROKER_URL"]
    lifecycle.celery_app = Celery("flex-bench", broker=broker, set_as_current=False)
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # No read timeout: a socket waits on a busy machine (as in flexsite.settings).
                "hosts": [{"address": settings.REDIS_URL, "socket_timeout": None}],
                "prefix": f"flex-bench-{uuid.uuid4().hex}",
            },
        }
    }
    return old_name


def django_teardown(old_name: str, var: Path) -> None:
    from django.db import connection

    from stack.backing import stack_vhost_delete

    stack_vhost_delete(var)
    if connection.vendor == "postgresql":
        # Threads of the socket and the watcher may still hold sessions: end them first.
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
    connection.creation.destroy_test_db(old_name, verbosity=0)


# ---------------------------------------------------------------- measurements


def measure_throughput(market: Any) -> dict[str, Any]:
    from chain import events as ev
    from marketplace.models import ChainEventRecord
    from marketplace.sync import ChainSync

    head = market.w3.eth.block_number
    started = time.perf_counter()
    scanned = sum(len(c.events) for c in ev.scan(market.w3, market.address, 0, head, chunk=2000))
    scan_s = time.perf_counter() - started

    sync = ChainSync(market=market)
    result = sync.run()
    if result.events != scanned or ChainEventRecord.objects.count() != scanned:
        raise RuntimeError(f"mirrored {result.events} of {scanned} events")
    idle = sync.run()
    return {
        "events": result.events,
        "blocks": head - (market.deploy_block or 0) + 1,
        "chunks": result.chunks,
        "sync_s": round(result.seconds, 3),
        "events_per_s": round(result.events / result.seconds, 1),
        "scan_only_events_per_s": round(scanned / scan_s, 1),
        "idle_pass_ms": round(idle.seconds * 1000, 1),
    }


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure_lag(chain: Chain, devices: list[str], buyer: LocalAccount) -> dict:
    from channels.testing import WebsocketCommunicator

    from chain.events import Role, TaskCreated
    from chain.node import chain_time
    from flexsite.asgi import application
    from marketplace.models import Task
    from marketplace.sync import ChainSync, chain_sync_watch

    headers = buyer_headers(buyer)
    now = chain_time(chain.w3)
    task_id = (
        chain.market.create_task(
            sender=buyer,
            spec_hash=keccak(text="lag"),
            rounds=1,
            min_trainers=1,
            max_trainers=10,
            bidding_ends=now + 86_400,
            round_timeout=600,
            budget_wei=10**18,
        )
        .first(TaskCreated)
        .task_id
    )
    stop = threading.Event()
    watcher = threading.Thread(
        target=_watch,
        args=(chain_sync_watch, ChainSync(market=chain.market), stop),
        daemon=True,
    )
    watcher.start()
    deadline = time.monotonic() + 30
    while not Task.objects.filter(chain_task_id=task_id, buyer__username="bench-buyer").exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the lag task was never mirrored")
        time.sleep(0.05)
    task = Task.objects.get(chain_task_id=task_id)
    rng = random.Random(7)

    stake = chain.market.task(task_id=task_id).trainer_stake_wei

    def bid(device: str) -> tuple[str, float]:
        tx = chain.call(
            device, 1, "placeBid", task_id, MIN_PRICE_WEI, 10, int(Role.TRAINER), value=stake
        )
        [tx_hash] = chain.rpc([("eth_sendTransaction", [tx])])
        # Automine: the block is mined by the time the node answers.
        return tx_hash, time.perf_counter()

    async def follow() -> list[float]:
        socket = WebsocketCommunicator(
            application, f"/ws/tasks/{task.chain_task_id}/", headers=headers
        )
        connected, _ = await socket.connect(timeout=LAG_TIMEOUT_S)
        if not connected:
            raise RuntimeError("the buyer's socket was refused")
        await socket.receive_json_from(timeout=LAG_TIMEOUT_S)
        lags = []
        for device in devices[:LAG_SAMPLES]:
            await asyncio.sleep(rng.uniform(0, POLL_S))  # land anywhere in the poll cycle
            tx_hash, mined = await asyncio.to_thread(bid, device)
            while True:
                message = await socket.receive_json_from(timeout=LAG_TIMEOUT_S)
                if any(t["tx_hash"] == tx_hash for t in message["snapshot"]["transactions"]):
                    break
            lags.append((time.perf_counter() - mined) * 1000)
        await socket.disconnect()
        return lags

    try:
        lags = asyncio.run(follow())
    finally:
        stop.set()
        watcher.join(timeout=10)
    return {
        "median": round(statistics.median(lags), 1),
        "p99": round(_quantile(lags, 0.99), 1),
        "max": round(max(lags), 1),
        "samples": len(lags),
        "poll_s": POLL_S,
    }


def _watch(loop: Any, sync: Any, stop: threading.Event) -> None:
    from django.db import connection

    try:
        loop(poll_s=POLL_S, stop=stop, sync=sync)
    finally:
        connection.close()


def table(results: dict[str, Any]) -> str:
    t, lag, push = results["throughput"], results["lag_ms"], results["push"]
    rows = [
        ("events mirrored", f"{t['events']} in {t['blocks']} blocks, {t['chunks']} chunk(s)"),
        ("sync throughput", f"{results['events_per_s']:.0f} events/s ({t['sync_s']:.2f} s)"),
        ("scan alone", f"{t['scan_only_events_per_s']:.0f} events/s"),
        ("idle sync pass", f"{t['idle_pass_ms']:.1f} ms"),
        ("lag median", f"{lag['median']:.0f} ms (block mined -> WebSocket message)"),
        ("lag p99", f"{lag['p99']:.0f} ms (max {lag['max']:.0f}, {lag['samples']} events)"),
        (
            "push per round",
            f"{push['bytes_round_2']} B at round 2, {push['bytes_round_last_but_one']} B at round "
            f"{push['rounds'] - 1} ({push['growth_bytes_per_round']:+.0f} B/round; snapshot "
            f"{push['snapshot_bytes_at_end']} B; {push['trainers']} trainers)",
        ),
        ("database", results["database"]),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sync", description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    from chain.client import FlexMarket
    from chain.launcher import LocalChain, dev_accounts

    broker_home = tempfile.TemporaryDirectory(prefix="flex-bench-sync-")
    real_db = django_setup(Path(broker_home.name))
    from django.conf import settings
    from django.db import connection

    started = time.monotonic()
    try:
        with LocalChain(accounts=3) as node:
            w3 = node.w3()
            owner, buyer = dev_accounts(2)
            market = FlexMarket.deploy(
                w3=w3,
                sender=owner,
                min_trainer_price_wei=MIN_PRICE_WEI,
                min_aggregator_price_wei=MIN_PRICE_WEI,
            )
            settings.ETH_RPC_URL, settings.FLEX_CONTRACT_ADDRESS = node.rpc_url, market.address
            chain = Chain(url=node.rpc_url, w3=w3, market=market, chain_id=w3.eth.chain_id)
            filled = prefill(chain, owner.address, buyer.address)
            print(f"pre-filled {filled['blocks']} blocks in {filled['seconds']:.1f} s", flush=True)
            throughput = measure_throughput(market)
            lag = measure_lag(chain, filled["devices"], buyer)
            push = measure_push(market, owner, buyer)
    finally:
        vendor = connection.vendor
        django_teardown(real_db, Path(broker_home.name))
        broker_home.cleanup()
    results = {
        "events_per_s": throughput["events_per_s"],
        "lag_ms": lag,
        "lag_target_ms": LAG_TARGET_MS,
        "throughput": throughput,
        "push": push,
        "prefill_s": round(filled["seconds"], 1),
        "database": vendor,
        "seconds": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {args.out}")
    return verdict(lag["p99"] < LAG_TARGET_MS)


if __name__ == "__main__":
    sys.exit(main())
