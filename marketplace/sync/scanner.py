"""The chain-sync scanner: FlexMarket's events into the mirror, chunk by chunk, re-org safe.

In the shape of web3.py's event scanner (STYLE.md): a cursor that rewinds
FLEX_SYNC_REORG_DEPTH blocks, chunked eth_getLogs up to the head minus
FLEX_SYNC_CONFIRMATIONS, and each chunk's rows written in one transaction with the cursor
(scanning, in chain.events, apart from storing, by marketplace.sync.writers). Every event is
kept as a ChainEventRecord keyed by (tx_hash, log_index); an event already recorded was
already applied, so running sync twice changes nothing.

Re-orgs. The cursor keeps the hash of its block, which changes with any block at or below
it. When the chain no longer has that hash, the fork point is the block after the newest
recorded event block the chain still has; when a process's first run, which rescans the last
FLEX_SYNC_REORG_DEPTH blocks, finds records the chain disagrees with, it is the lowest such
block. Sync then deletes every record from the fork point on and re-derives each affected
task's mirror rows by replaying the task's remaining records (a task whose creation is gone
is deleted; reports on rounds whose global model is unchanged stay valid), recomputes
affected devices' chain status, forgets the lifecycle actions fired by or for orphaned
transactions, and moves the cursor back, all in one transaction; the scan then mirrors the
winning branch as new events, which fire their own lifecycle triggers.

One sync runs at a time: a Redis lock per database and contract; each chunk also locks the
cursor row and checks that nobody moved it, so a lost lock cannot write twice.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import redis
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from web3.exceptions import BlockNotFound

from chain import events as ev
from chain.client import FlexMarket
from chain.follow import Doorbell
from chain.node import chain_time, reachable
from marketplace import contract
from marketplace.models import ChainCursor, ChainEventRecord, LifecycleAction
from marketplace.sync.mirror import BATCH, Mirror, devices_rederive, task_rederive
from marketplace.sync.records import MirrorEvent, hex_of
from marketplace.sync.writers.devices import DEVICE_EVENTS, devices_reconcile

log = logging.getLogger(__name__)

T = TypeVar("T")

# A run holds the lock this long without renewing it (it renews after every chunk).
LOCK_TTL_S = 120
# Rewinds one run may do before leaving the rest to the next tick (a chain re-orging non-stop).
MAX_REWINDS = 3
# Syncs one run may do for requests that came while it held the lock (then the next ring's).
MAX_RUNS = 5
# Events whose block time the mirror keeps: the deadlines that count from them (lifecycle).
TIMED_EVENTS = frozenset({"NodesSelected", "GlobalModelPublished"})


@functools.cache
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def _rpc(call: Callable[[], T]) -> T:
    with reachable():
        return call()


# ---------------------------------------------------------------- the sync


@dataclass
class SyncResult:
    """What one run did. ``status`` is "synced", or "busy" when another run held the lock."""

    status: str = "synced"
    head: int | None = None
    from_block: int | None = None
    to_block: int | None = None
    events: int = 0
    chunks: int = 0
    rewinds: int = 0
    lag_ms: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ReorgFound(Exception):
    """The rescanned blocks disagree with the records from ``fork`` on."""

    def __init__(self, fork: int) -> None:
        super().__init__(fork)
        self.fork = fork


class _CursorMoved(Exception):
    """Another run moved the cursor under this one (its lock must have expired)."""


class ChainSync:
    """Mirrors one FlexMarket into the database; ``run()`` once per tick, from any process.

    Keep one object per process: its first run rewinds FLEX_SYNC_REORG_DEPTH blocks and
    checks them against the records, later runs scan only new blocks.
    """

    def __init__(
        self,
        *,
        market: FlexMarket | None = None,
        confirmations: int | None = None,
        reorg_depth: int | None = None,
        chunk_blocks: int | None = None,
        retries: int = 2,
    ) -> None:
        self.market = market or contract.market()
        self.confirmations = (
            settings.FLEX_SYNC_CONFIRMATIONS if confirmations is None else confirmations
        )
        self.reorg_depth = settings.FLEX_SYNC_REORG_DEPTH if reorg_depth is None else reorg_depth
        self.chunk_blocks = chunk_blocks or settings.FLEX_SYNC_CHUNK_BLOCKS
        # The next tick is the real retry: a dead node should fail a run fast.
        self.retries = retries
        self._lock: redis.lock.Lock | None = None
        self._expected: tuple[int, str] | None = None
        self._clock_offset: float | None = None
        # The first run rewinds FLEX_SYNC_REORG_DEPTH blocks and checks them against the
        # records; later runs rely on the cursor's block hash (which changes with any block
        # at or below it), so a steady tick rescans nothing.
        self._started = False

    @property
    def lock_name(self) -> str:
        return f"flex:chain-sync:{connection.settings_dict['NAME']}:{self.market.address}"

    @contextlib.contextmanager
    def lock(self) -> Iterator[bool]:
        """Holds the sync lock if it is free; yields whether this run got it."""
        lock = _redis(settings.REDIS_URL).lock(self.lock_name, timeout=LOCK_TTL_S, blocking=False)
        held = lock.acquire()
        self._lock = lock if held else None
        try:
            yield held
        finally:
            self._lock = None
            if held:
                with contextlib.suppress(redis.exceptions.LockError):
                    lock.release()

    def run(self) -> SyncResult:
        """Mirror everything up to the safe head; ChainUnavailableError if the node is gone
        (whatever was committed before stays, nothing is half-written).

        A run asked for while another holds the lock ("busy") is not lost: it leaves a
        request that the holder finds once it lets go, and then it syncs again. So a block
        that rang for a sync while one was running is mirrored without waiting for a tick."""
        started = time.monotonic()
        requests = _redis(settings.REDIS_URL)
        wanted = f"{self.lock_name}:wanted"
        requests.set(wanted, 1, ex=LOCK_TTL_S)
        result = SyncResult(status="busy")
        for _ in range(MAX_RUNS):
            with self.lock() as held:
                if not held:
                    break
                requests.delete(wanted)
                try:
                    result = self._run()
                except _CursorMoved:
                    log.warning("chain sync: another run moved the cursor; leaving it to that one")
                    return SyncResult(status="busy")
            if not requests.exists(wanted):
                break
        result.seconds = time.monotonic() - started
        return result

    # ------------------------------------------------------------ steps

    def _run(self) -> SyncResult:
        w3 = self.market.w3
        head = _rpc(lambda: w3.eth.block_number)
        target = head - self.confirmations
        self._clock_offset = None
        cursor = self._cursor()
        self._expected = (cursor.block_number, cursor.block_hash)
        devices_reconcile()
        result = SyncResult(head=head, from_block=cursor.block_number + 1)
        fork = self._fork_point(cursor)
        for _ in range(MAX_REWINDS + 1):
            if fork is not None:
                if result.rewinds == MAX_REWINDS:
                    log.warning("chain sync: still re-orging after %d rewinds", MAX_REWINDS)
                    break
                self._rewind(cursor, fork)
                result.rewinds += 1
            try:
                self._scan(cursor, target, result)
                break
            except _ReorgFound as found:
                fork = found.fork
        ChainCursor.objects.filter(pk=cursor.pk).update(head_block=head, synced_at=timezone.now())
        result.to_block = cursor.block_number
        return result

    def _cursor(self) -> ChainCursor:
        cursor = ChainCursor.objects.filter(contract_address=self.market.address).first()
        if cursor is not None:
            return cursor
        deploy_block = self._deploy_block()
        cursor, _ = ChainCursor.objects.get_or_create(
            contract_address=self.market.address,
            defaults={
                "chain_id": _rpc(lambda: self.market.w3.eth.chain_id),
                "deploy_block": deploy_block,
                "block_number": max(deploy_block - 1, 0),
                "block_hash": "",
            },
        )
        return cursor

    def _deploy_block(self) -> int:
        """The contract's first block: known to a freshly deployed client or from the
        deployment record, else found by bisecting eth_getCode (a few dozen calls, once per
        cursor; needs a node that keeps old state)."""
        if self.market.deploy_block is not None:
            return self.market.deploy_block
        w3, address = self.market.w3, self.market.address
        record = contract.deployment_load()
        if record is not None and record.address.lower() == address.lower():
            return record.block
        lo, hi = 0, _rpc(lambda: w3.eth.block_number)
        while lo < hi:
            mid = (lo + hi) // 2
            if _rpc(lambda b=mid: w3.eth.get_code(address, block_identifier=b)):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _hash_at(self, number: int) -> str | None:
        try:
            block = _rpc(lambda: self.market.w3.eth.get_block(number))
        except BlockNotFound:
            return None
        return hex_of(block["hash"])

    def _chain_now(self) -> float:
        """Now on the chain's clock: wall time, shifted when the node's clock was moved (a dev
        chain after evm_increaseTime), so that lag means the same on any chain."""
        if self._clock_offset is None:
            offset = chain_time(self.market.w3) - time.time()
            # Block times are whole seconds: only a shift beyond their rounding counts.
            self._clock_offset = offset if abs(offset) > 2 else 0.0
        return time.time() + self._clock_offset

    def _block_times(self, numbers: Iterable[int]) -> dict[int, int]:
        w3 = self.market.w3
        return {n: _rpc(lambda b=n: w3.eth.get_block(b))["timestamp"] for n in set(numbers)}

    def _fork_point(self, cursor: ChainCursor) -> int | None:
        """None while the chain still has the cursor's block; else the first block whose
        records may be orphaned (one above the newest record block the chain still has)."""
        if not cursor.block_hash or self._hash_at(cursor.block_number) == cursor.block_hash:
            return None
        blocks = list(
            ChainEventRecord.objects.filter(block_number__lte=cursor.block_number)
            .values_list("block_number", "block_hash")
            .order_by("-block_number")
            .distinct()
        )
        # Hashes chain blocks together: once a recorded block is still on chain, so is every
        # block below it. Bisect for the newest one (a chain reset costs a few calls too).
        lo, hi = 0, len(blocks)
        while lo < hi:
            mid = (lo + hi) // 2
            number, block_hash = blocks[mid]
            if self._hash_at(number) == block_hash:
                hi = mid
            else:
                lo = mid + 1
        fork = blocks[lo][0] + 1 if lo < len(blocks) else cursor.deploy_block
        log.warning(
            "chain sync: re-org: block %s is no longer %s; rewinding to block %s",
            cursor.block_number,
            cursor.block_hash,
            fork,
        )
        return fork

    def _locked_cursor(self, cursor: ChainCursor) -> ChainCursor:
        locked = ChainCursor.objects.select_for_update().get(pk=cursor.pk)
        if (locked.block_number, locked.block_hash) != self._expected:
            raise _CursorMoved
        return locked

    def _commit_cursor(self, cursor: ChainCursor, locked: ChainCursor) -> None:
        locked.save()
        cursor.block_number, cursor.block_hash = locked.block_number, locked.block_hash
        cursor.last_lag_ms = locked.last_lag_ms
        self._expected = (locked.block_number, locked.block_hash)

    def _rewind(self, cursor: ChainCursor, fork: int) -> None:
        """Forget every record from block ``fork`` on and re-derive what they touched."""
        keep = fork - 1
        keep_hash = (self._hash_at(keep) or "") if keep >= cursor.deploy_block else ""
        with transaction.atomic():
            locked = self._locked_cursor(cursor)
            orphans = ChainEventRecord.objects.filter(block_number__gte=fork)
            gone = list(orphans.values_list("tx_hash", "name", "task_id", "args"))
            orphans.delete()
            txs = sorted({tx for tx, *_ in gone})
            for i in range(0, len(txs), BATCH):
                LifecycleAction.objects.filter(tx_hash__in=txs[i : i + BATCH]).delete()
            mirror = Mirror()
            for chain_task_id in sorted({t for _, _, t, _ in gone if t is not None}):
                task_rederive(mirror, chain_task_id)
            devices_rederive(
                mirror, {args["device"] for _, name, _, args in gone if name in DEVICE_EVENTS}
            )
            mirror.flush()
            mirror.push_on_commit()
            locked.block_number, locked.block_hash = max(keep, 0), keep_hash
            self._commit_cursor(cursor, locked)
        log.warning(
            "chain sync: dropped %d orphaned event(s) from block %s; %d task(s) re-derived",
            len(gone),
            fork,
            len({t for _, _, t, _ in gone if t is not None}),
        )

    def _scan(self, cursor: ChainCursor, target: int, result: SyncResult) -> None:
        rewind = self.reorg_depth if not self._started else 0
        start = max(cursor.block_number + 1 - rewind, cursor.deploy_block)
        chunks = ev.scan(
            self.market.w3,
            self.market.address,
            start,
            target,
            chunk=self.chunk_blocks,
            retries=self.retries,
            retry_delay=0.2,
        )
        for chunk in chunks:
            added, lag_ms = self._store_chunk(cursor, chunk)
            result.chunks += 1
            result.events += added
            if lag_ms is not None:
                result.lag_ms = lag_ms
            if self._lock is not None:
                self._lock.reacquire()
        self._started = True

    def _known(self, fresh: list[MirrorEvent]) -> dict[tuple[str, int], tuple[str, int]]:
        """(tx_hash, log_index) -> (block_hash, block_number) of those already recorded."""
        txs = sorted({e.tx_hash for e in fresh})
        known: dict[tuple[str, int], tuple[str, int]] = {}
        for i in range(0, len(txs), BATCH):
            rows = ChainEventRecord.objects.filter(tx_hash__in=txs[i : i + BATCH])
            for tx, index, block_hash, number in rows.values_list(
                "tx_hash", "log_index", "block_hash", "block_number"
            ):
                known[(tx, index)] = (block_hash, number)
        return known

    def _check_window(
        self, chunk: ev.ScannedChunk, fresh: list[MirrorEvent], known: dict, mirrored_to: int
    ) -> None:
        """Raises _ReorgFound if the rescan disagrees with what was recorded."""
        suspects = [
            min(e.block_number, known[e.key][1])
            for e in fresh
            if e.key in known and known[e.key][0] != e.block_hash
        ]
        if chunk.from_block <= mirrored_to:
            upto = min(chunk.to_block, mirrored_to)
            seen = {e.key: e.block_hash for e in fresh}
            stored = ChainEventRecord.objects.filter(
                block_number__gte=chunk.from_block, block_number__lte=upto
            ).values_list("tx_hash", "log_index", "block_hash", "block_number")
            suspects += [n for tx, i, h, n in stored if seen.get((tx, i)) != h]
            # An event in an already-mirrored block that was never recorded: replay in order.
            suspects += [
                e.block_number for e in fresh if e.block_number <= upto and e.key not in known
            ]
        if suspects:
            raise _ReorgFound(min(suspects))

    def _store_chunk(self, cursor: ChainCursor, chunk: ev.ScannedChunk) -> tuple[int, float | None]:
        fresh = [MirrorEvent.from_chain(e) for e in chunk.events]
        known = self._known(fresh) if fresh else {}
        self._check_window(chunk, fresh, known, cursor.block_number)
        new = [e for e in fresh if e.key not in known]
        # Every chain read happens before the transaction, so a lost node cannot cut it.
        wanted = {e.block_number for e in new if e.name in TIMED_EVENTS}
        if new:
            wanted.add(new[-1].block_number)
        stamped = {e.block_number: e.block_time for e in chunk.events if e.block_time}
        times = {n: stamped[n] for n in wanted & stamped.keys()}
        times |= self._block_times(wanted - stamped.keys())
        if new:
            self._chain_now()  # reads the chain's clock now, not inside the transaction
        with transaction.atomic():
            locked = self._locked_cursor(cursor)
            ChainEventRecord.objects.bulk_create([e.as_record() for e in new], batch_size=500)
            mirror = Mirror(block_times=times)
            for event in new:
                mirror.apply(event, new=True)
            mirror.flush()
            mirror.react()
            mirror.push_on_commit()
            mirror.reports_on_commit()
            lag_ms = None
            if new:
                lag_ms = (self._chain_now() - times[new[-1].block_number]) * 1000
                locked.last_lag_ms = lag_ms
            if chunk.to_block >= locked.block_number:
                locked.block_number, locked.block_hash = chunk.to_block, chunk.to_block_hash
            self._commit_cursor(cursor, locked)
        if new:
            log.info(
                "chain sync: mirrored %d event(s) in blocks %d..%d, lag %.0f ms",
                len(new),
                chunk.from_block,
                chunk.to_block,
                lag_ms,
            )
        return len(new), lag_ms


# ---------------------------------------------------------------- entry points


@functools.cache
def _process_sync(rpc_url: str, address: str) -> ChainSync:
    return ChainSync(market=FlexMarket(w3=contract.w3(), address=address))


def chain_sync() -> SyncResult:
    """One sync run with the settings' chain, contract and FLEX_SYNC_* values. The process
    keeps its ChainSync between runs, so only its first run rewinds (see ChainSync)."""
    return _process_sync(settings.ETH_RPC_URL, contract.address()).run()


def chain_sync_watch(
    *,
    poll_s: float | None = None,
    stop: threading.Event | None = None,
    sync: ChainSync | None = None,
    on_result: Callable[[SyncResult], None] | None = None,
) -> None:
    """Sync whenever the node announces a new block (its websocket's newHeads, chain.follow),
    and at least every ``poll_s`` (default FLEX_SYNC_INTERVAL_S) whether or not it does,
    until ``stop`` is set. A lost node is logged and looked at again as it comes back."""
    stop = stop or threading.Event()
    sync = sync or ChainSync()

    def ring() -> None:
        try:
            result = sync.run()
        finally:
            connection.close()  # the doorbell's thread keeps no connection between rings
        if on_result is not None:
            on_result(result)

    bell = Doorbell(
        url=sync.market.w3.provider.endpoint_uri,
        ring=ring,
        idle_s=settings.FLEX_SYNC_INTERVAL_S if poll_s is None else poll_s,
        name="chain-sync",
    ).start()
    try:
        stop.wait()
    finally:
        bell.stop()
