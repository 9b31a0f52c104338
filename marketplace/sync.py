"""Chain sync: mirror FlexMarket's events into the database, chunk by chunk, re-org safe.

In the shape of web3.py's event scanner (STYLE.md): a cursor that rewinds
FLEX_SYNC_REORG_DEPTH blocks, chunked eth_getLogs up to the head minus
FLEX_SYNC_CONFIRMATIONS, and each chunk's rows written in one transaction with the cursor
(scanning, in chain.events, apart from storing, here). Every event is kept as a
ChainEventRecord keyed by (tx_hash, log_index); an event already recorded was already applied,
so running sync twice changes nothing.

Re-orgs. The cursor keeps the hash of its block, which changes with any block at or below
it. When the chain no longer has that hash, the fork point is the block after the newest
recorded event block the chain still has; when a process's first run, which rescans the last
FLEX_SYNC_REORG_DEPTH blocks, finds records the chain disagrees with, it is the lowest such
block. Sync then deletes every record from the fork point on and re-derives each affected
task's mirror rows by replaying the task's remaining records (round metrics survive where
the global model is unchanged), recomputes affected devices' chain status, forgets the
lifecycle actions fired by or for orphaned transactions, and moves the cursor back, all in
one transaction; the scan then mirrors the winning branch as new events, which fire their
own lifecycle triggers.

One sync runs at a time: a Redis lock per database and contract; each chunk also locks the
cursor row and checks that nobody moved it, so a lost lock cannot write twice.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from web3.exceptions import BlockNotFound

from chain import events as ev
from chain.client import FlexMarket
from chain.errors import ChainUnavailableError
from chain.node import chain_time, reachable
from marketplace import contract, lifecycle
from marketplace.consumers import task_updates_push
from marketplace.models import (
    Bid,
    ChainCursor,
    ChainEventRecord,
    Device,
    LifecycleAction,
    Payout,
    PayoutReason,
    Role,
    Round,
    SelectedNode,
    Task,
    TaskState,
    Update,
    Wallet,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# A run holds the lock this long without renewing it (it renews after every chunk).
LOCK_TTL_S = 120
# Rewinds one run may do before leaving the rest to the next tick (a chain re-orging non-stop).
MAX_REWINDS = 3
# Rows per query when looking events up by transaction hash (SQLite caps query parameters).
LOOKUP_BATCH = 500
DEVICE_EVENTS = ("DeviceRegistered", "DeviceRevoked")
# What sync owns on a Task row; the website owns the rest (buyer, title, spec), so saving
# only these never undoes what it wrote meanwhile.
MIRROR_FIELDS = [
    "chain_task_id",
    "buyer_address",
    "spec_hash",
    "budget_wei",
    "rounds",
    "min_trainers",
    "max_trainers",
    "bidding_ends",
    "round_timeout_s",
    "created_tx",
    "created_block",
    "state",
    "aggregator",
    "aggregator_price_wei",
    "published_rounds",
    "trainers_paid_wei",
    "aggregator_paid_wei",
    "refunded_wei",
    "failure_reason",
    "updated_at",
]
_CREDIT_REASONS = {
    "trainer_pay": PayoutReason.TRAINER_PAY,
    "aggregator_pay": PayoutReason.AGGREGATOR_PAY,
    "refund": PayoutReason.REFUND,
}


@functools.cache
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def _rpc(call: Callable[[], T]) -> T:
    with reachable():
        return call()


def _hex(value: Any) -> str:
    return value if isinstance(value, str) else "0x" + bytes(value).hex()


def _when(timestamp: int | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, tz=UTC)


# ---------------------------------------------------------------- events as stored


def _json_arg(name: str, value: Any) -> Any:
    """One event argument as JSON: wei amounts and masks as decimal strings (exact in any
    JSON reader, browsers included), the contract's enums by lower-case name."""
    if isinstance(value, tuple | list):
        return [_json_arg(name, v) for v in value]
    if isinstance(value, enum.Enum):
        return value.name.lower()
    if isinstance(value, int) and not isinstance(value, bool) and name.endswith(("_wei", "_mask")):
        return str(value)
    return value


def event_args(event: ev.ChainEvent) -> dict[str, Any]:
    """The event's own arguments as ChainEventRecord.args holds them."""
    return {name: _json_arg(name, getattr(event, name)) for name in ev.event_fields(type(event))}


@dataclass(frozen=True)
class MirrorEvent:
    """An event as the mirror stores and replays it: where it is on chain, and its args."""

    name: str
    args: dict[str, Any]
    tx_hash: str
    log_index: int
    block_number: int
    block_hash: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.tx_hash, self.log_index)

    @property
    def task_id(self) -> int | None:
        return self.args.get("task_id")

    @classmethod
    def from_chain(cls, event: ev.ChainEvent) -> MirrorEvent:
        return cls(
            name=event.name,
            args=event_args(event),
            tx_hash=event.tx_hash,
            log_index=event.log_index,
            block_number=event.block_number,
            block_hash=event.block_hash,
        )

    @classmethod
    def from_record(cls, record: ChainEventRecord) -> MirrorEvent:
        return cls(
            name=record.name,
            args=record.args,
            tx_hash=record.tx_hash,
            log_index=record.log_index,
            block_number=record.block_number,
            block_hash=record.block_hash,
        )

    def as_record(self) -> ChainEventRecord:
        return ChainEventRecord(
            name=self.name,
            args=self.args,
            task_id=self.task_id,
            tx_hash=self.tx_hash,
            log_index=self.log_index,
            block_number=self.block_number,
            block_hash=self.block_hash,
        )


# ---------------------------------------------------------------- applying events


class _Mirror:
    """Applies events to the mirror rows inside one transaction.

    Tasks are cached and saved once at the end; bids and device statuses, the numerous
    events, are written in bulk by ``flush``. Everything else is written as it comes.
    """

    def __init__(self, *, block_times: dict[int, int] | None = None) -> None:
        self.block_times = block_times or {}
        self.tasks: dict[int, Task | None] = {}
        self.dirty: set[int] = set()
        self.bids: dict[tuple[int, str], dict[str, Any]] = {}
        self.devices: dict[str, str] = {}
        self.new_events: dict[int, set[str]] = defaultdict(set)
        self.touched: set[int] = set()
        self.handlers: dict[str, Callable[[MirrorEvent], None]] = {
            "TaskCreated": self._task_created,
            "BidPlaced": self._bid_placed,
            "NodesSelected": self._nodes_selected,
            "TaskFailed": self._task_failed,
            "TaskCancelled": self._task_cancelled,
            "GlobalModelPublished": self._global_model_published,
            "UpdateSubmitted": self._update_submitted,
            "TaskFinalized": self._task_settled,
            "TaskAborted": self._task_settled,
            "PaymentCredited": self._payment_credited,
            "DeviceRegistered": self._device_status,
            "DeviceRevoked": self._device_status,
        }

    def task(self, chain_task_id: int) -> Task | None:
        if chain_task_id not in self.tasks:
            self.tasks[chain_task_id] = Task.objects.filter(chain_task_id=chain_task_id).first()
        return self.tasks[chain_task_id]

    def apply(self, event: MirrorEvent, *, new: bool) -> None:
        handler = self.handlers.get(event.name)
        if handler is not None:
            handler(event)
        if new and event.task_id is not None:
            self.new_events[event.task_id].add(event.name)

    def flush(self) -> None:
        self._flush_bids()
        for status in ("active", "revoked", "none"):
            addresses = [a for a, s in self.devices.items() if s == status]
            if addresses:
                Device.objects.filter(address__in=addresses).update(chain_status=status)
        for chain_task_id in self.dirty:
            task = self.tasks.get(chain_task_id)
            if task is not None and task.pk is not None:
                task.save(update_fields=MIRROR_FIELDS)
        self.dirty.clear()

    def react(self) -> None:
        """The lifecycle steps the new events call for, from each task's state after them."""
        for chain_task_id, names in self.new_events.items():
            task = self.tasks.get(chain_task_id)
            if task is not None and task.pk is not None:
                lifecycle.task_react(task=task, new_events=names)

    def push_on_commit(self) -> None:
        if self.touched:
            touched = sorted(self.touched)
            transaction.on_commit(
                functools.partial(task_updates_push, task_ids=touched), robust=True
            )

    # ------------------------------------------------------------ helpers

    def _task_of(self, event: MirrorEvent) -> Task | None:
        task = self.task(event.task_id)
        if task is None:
            log.warning(
                "%s in %s names task %s, which the mirror does not have; kept as a record only",
                event.name,
                event.tx_hash,
                event.task_id,
            )
        return task

    def _changed(self, task: Task) -> None:
        self.dirty.add(task.chain_task_id)
        self.touched.add(task.pk)

    def _flush_bids(self) -> None:
        if not self.bids:
            return
        task_pks = {pk for pk, _ in self.bids}
        existing = {(b.task_id, b.device): b for b in Bid.objects.filter(task_id__in=task_pks)}
        fields = ["bid_index", "role", "price_per_round_wei", "samples", "tx_hash", "block_number"]
        changed, created = [], []
        for key, values in self.bids.items():
            bid = existing.get(key)
            if bid is None:
                created.append(Bid(task_id=key[0], device=key[1], **values))
            else:
                for name in fields:
                    setattr(bid, name, values[name])
                changed.append(bid)
        Bid.objects.bulk_create(created, batch_size=LOOKUP_BATCH)
        Bid.objects.bulk_update(changed, fields, batch_size=LOOKUP_BATCH)
        self.bids.clear()

    # ------------------------------------------------------------ handlers

    def _task_created(self, e: MirrorEvent) -> None:
        a = e.args
        task = self.task(a["task_id"])
        if (
            task is not None
            and task.spec
            and task.spec_hash
            and task.spec_hash.lower() != a["spec_hash"].lower()
        ):
            # A re-org gave this id to another task: the website's row waits, unlinked, for
            # its own transaction to be mined again (matched then by created_tx).
            log.warning(
                "task id %s now belongs to %s's task %s; unlinking row %s",
                a["task_id"],
                a["buyer"],
                e.tx_hash,
                task.pk,
            )
            task.chain_task_id = None
            task.state = TaskState.PENDING
            task.save(update_fields=["chain_task_id", "state", "updated_at"])
            self.touched.add(task.pk)
            task = None
        if task is None:
            task = Task.objects.filter(chain_task_id__isnull=True, created_tx=e.tx_hash).first()
        if task is None:
            # Created on chain by someone not using the website: the spec is unknown.
            task = Task(spec={})
        task.chain_task_id = a["task_id"]
        task.buyer_address = a["buyer"]
        task.spec_hash = a["spec_hash"]
        task.budget_wei = int(a["budget_wei"])
        task.rounds = a["rounds"]
        task.min_trainers = a["min_trainers"]
        task.max_trainers = a["max_trainers"]
        task.bidding_ends = _when(a["bidding_ends"])
        task.round_timeout_s = a["round_timeout"]
        task.created_tx = e.tx_hash
        task.created_block = e.block_number
        task.state = TaskState.BIDDING
        if task.pk is None:
            task.save()
        else:
            task.save(update_fields=MIRROR_FIELDS)
        if task.buyer_id is None:
            # A buyer who posted from their own wallet, not through the website.
            wallet = Wallet.objects.filter(address=a["buyer"]).first()
            if wallet is not None:
                Task.objects.filter(pk=task.pk, buyer__isnull=True).update(buyer=wallet.user_id)
                task.buyer_id = wallet.user_id
        self.tasks[task.chain_task_id] = task
        self._changed(task)

    def _bid_placed(self, e: MirrorEvent) -> None:
        task = self._task_of(e)
        if task is None:
            return
        a = e.args
        self.bids[(task.pk, a["device"])] = {
            "bid_index": a["bid_index"],
            "role": Role(a["role"]),
            "price_per_round_wei": int(a["price_per_round_wei"]),
            "samples": a["samples"],
            "tx_hash": e.tx_hash,
            "block_number": e.block_number,
        }
        self.touched.add(task.pk)

    def _nodes_selected(self, e: MirrorEvent) -> None:
        task = self._task_of(e)
        if task is None:
            return
        a = e.args
        task.aggregator = a["aggregator"]
        task.aggregator_price_wei = int(a["aggregator_price_wei"])
        task.state = TaskState.RUNNING
        where = {"task": task, "tx_hash": e.tx_hash, "block_number": e.block_number}
        nodes = [
            SelectedNode(
                device=a["aggregator"],
                role=Role.AGGREGATOR,
                price_per_round_wei=task.aggregator_price_wei,
                **where,
            )
        ]
        for position, (device, price) in enumerate(
            zip(a["trainers"], a["trainer_prices_wei"], strict=True)
        ):
            nodes.append(
                SelectedNode(
                    device=device,
                    role=Role.TRAINER,
                    position=position,
                    price_per_round_wei=int(price),
                    **where,
                )
            )
        SelectedNode.objects.bulk_create(nodes)
        self._changed(task)

    def _task_failed(self, e: MirrorEvent) -> None:
        task = self._task_of(e)
        if task is not None:
            task.state = TaskState.FAILED
            task.failure_reason = e.args["reason"]
            self._changed(task)

    def _task_cancelled(self, e: MirrorEvent) -> None:
        task = self._task_of(e)
        if task is not None:
            task.state = TaskState.CANCELLED
            self._changed(task)

    def _global_model_published(self, e: MirrorEvent) -> None:
        task = self._task_of(e)
        if task is None:
            return
        a = e.args
        number, mask = a["round"], int(a["aggregated_mask"])
        row = Round.objects.filter(task=task, number=number).first() or Round(
            task=task, number=number
        )
        if row.global_model_id.lower() != a["model_id"].lower():
            # Metrics belong to one global model: a different one (after a re-org) has none yet.
            row.accuracy = row.loss = row.gas_used = None
        row.global_model_id = a["model_id"]
        row.aggregated_mask = str(mask)
        row.updates_aggregated = mask.bit_count()
        row.tx_hash, row.block_number = e.tx_hash, e.block_number
        row.published_at = _when(self.block_times.get(e.block_number)) or row.published_at
        row.save()
        task.published_rounds = number + 1
        if number == task.rounds:
            task.state = TaskState.TRAINED
        self._changed(task)

    def _update_submitted(self, e: MirrorEvent) -> None:
        task = self._task_of(e)
        if task is None:
            return
        a = e.args
        Update.objects.update_or_create(
            task=task,
            round_number=a["round"],
            trainer=a["trainer"],
            defaults={
                "position": a["position"],
                "model_id": a["model_id"],
                "tx_hash": e.tx_hash,
                "block_number": e.block_number,
            },
        )
        self.touched.add(task.pk)

    def _task_settled(self, e: MirrorEvent) -> None:
        task = self._task_of(e)
        if task is None:
            return
        a = e.args
        task.state = TaskState.FINALIZED if e.name == "TaskFinalized" else TaskState.ABORTED
        task.trainers_paid_wei = int(a["trainers_paid_wei"])
        task.aggregator_paid_wei = int(a["aggregator_paid_wei"])
        task.refunded_wei = int(a["refunded_wei"])
        if "published_rounds" in a:
            task.published_rounds = a["published_rounds"]
        self._changed(task)

    def _payment_credited(self, e: MirrorEvent) -> None:
        task = self._task_of(e)
        if task is None:
            return
        a = e.args
        Payout.objects.create(
            task=task,
            tx_hash=e.tx_hash,
            block_number=e.block_number,
            log_index=e.log_index,
            account=a["account"],
            amount_wei=int(a["amount_wei"]),
            reason=_CREDIT_REASONS[a["reason"]],
        )
        self.touched.add(task.pk)

    def _device_status(self, e: MirrorEvent) -> None:
        self.devices[e.args["device"]] = "active" if e.name == "DeviceRegistered" else "revoked"


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
        (whatever was committed before stays, nothing is half-written)."""
        started = time.monotonic()
        with self.lock() as held:
            if not held:
                return SyncResult(status="busy")
            try:
                result = self._run()
            except _CursorMoved:
                log.warning("chain sync: another run moved the cursor; leaving it to that one")
                return SyncResult(status="busy")
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
        self._devices_reconcile()
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
        return _hex(block["hash"])

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
            for i in range(0, len(txs), LOOKUP_BATCH):
                LifecycleAction.objects.filter(tx_hash__in=txs[i : i + LOOKUP_BATCH]).delete()
            mirror = _Mirror()
            for chain_task_id in sorted({t for _, _, t, _ in gone if t is not None}):
                _task_rederive(mirror, chain_task_id)
            for device in {args["device"] for _, name, _, args in gone if name in DEVICE_EVENTS}:
                mirror.devices[device] = _device_status_of(device)
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
        for i in range(0, len(txs), LOOKUP_BATCH):
            rows = ChainEventRecord.objects.filter(tx_hash__in=txs[i : i + LOOKUP_BATCH])
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
        wanted = {e.block_number for e in new if e.name == "GlobalModelPublished"}
        if new:
            wanted.add(new[-1].block_number)
        times = self._block_times(wanted)
        if new:
            self._chain_now()  # reads the chain's clock now, not inside the transaction
        with transaction.atomic():
            locked = self._locked_cursor(cursor)
            ChainEventRecord.objects.bulk_create([e.as_record() for e in new], batch_size=500)
            mirror = _Mirror(block_times=times)
            for event in new:
                mirror.apply(event, new=True)
            mirror.flush()
            mirror.react()
            mirror.push_on_commit()
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

    def _devices_reconcile(self) -> None:
        """Devices enrolled after sync saw their DeviceRegistered (the enrolment transaction
        commits after the chain call) take their status from the records."""
        for device in Device.objects.filter(chain_status="none"):
            status = _device_status_of(device.address)
            if status != "none":
                Device.objects.filter(pk=device.pk).update(chain_status=status)


def _device_status_of(address: str) -> str:
    latest = (
        ChainEventRecord.objects.filter(name__in=DEVICE_EVENTS, args__device=address)
        .order_by("-block_number", "-log_index")
        .first()
    )
    if latest is None:
        return "none"
    return "active" if latest.name == "DeviceRegistered" else "revoked"


def _task_rederive(mirror: _Mirror, chain_task_id: int) -> None:
    """Rebuild one task's mirror rows from its remaining records, in chain order."""
    task = Task.objects.filter(chain_task_id=chain_task_id).first()
    if task is None:
        return
    for model in (Bid, SelectedNode, Update, Payout):
        model.objects.filter(task=task).delete()
    task.state = TaskState.PENDING
    task.aggregator, task.aggregator_price_wei = "", None
    task.published_rounds = 0
    task.trainers_paid_wei = task.aggregator_paid_wei = task.refunded_wei = None
    task.failure_reason = ""
    mirror.tasks[chain_task_id] = task
    records = ChainEventRecord.objects.filter(task_id=chain_task_id).order_by(
        "block_number", "log_index"
    )
    created = False
    for record in records:
        created = created or record.name == "TaskCreated"
        mirror.apply(MirrorEvent.from_record(record), new=False)
    Round.objects.filter(task=task, number__gte=task.published_rounds).delete()
    task.refresh_from_db(fields=["spec"])
    if not created and not task.spec:
        # Only the orphaned branch knew this task, and nobody posted it from the website.
        mirror.tasks[chain_task_id] = None
        task.delete()
        return
    mirror.dirty.add(chain_task_id)
    mirror.touched.add(task.pk)


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
    poll_s: float = 0.1,
    stop: threading.Event | None = None,
    sync: ChainSync | None = None,
    on_result: Callable[[SyncResult], None] | None = None,
) -> None:
    """Sync whenever the chain's head moves (polled every ``poll_s``), and at least every
    FLEX_SYNC_INTERVAL_S, until ``stop`` is set. A lost node is logged and retried."""
    stop = stop or threading.Event()
    sync = sync or ChainSync()
    interval = settings.FLEX_SYNC_INTERVAL_S
    last_head, last_run = None, 0.0
    while not stop.is_set():
        try:
            head = _rpc(lambda: sync.market.w3.eth.block_number)
            if head != last_head or time.monotonic() - last_run >= interval:
                result = sync.run()
                last_run = time.monotonic()
                if result.status == "synced":
                    last_head = head
                if on_result is not None:
                    on_result(result)
        except ChainUnavailableError as exc:
            log.warning("chain sync: %s; retrying", exc.message)
            last_head = None
            stop.wait(max(interval, poll_s))
            continue
        except Exception:
            # A watcher outlives a database hiccup the way the beat job does: next tick.
            log.exception("chain sync failed; retrying")
            last_head = None
            stop.wait(max(interval, poll_s))
            continue
        stop.wait(poll_s)
