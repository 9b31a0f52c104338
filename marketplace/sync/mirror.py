"""The mirror's unit of work: applies events to mirror rows inside one transaction.

Each event family has its writer in ``marketplace.sync.writers``; this holds what they share
(the tasks read so far, the bids and device statuses buffered for bulk writes, the tasks
touched) and, after the writers ran, saves, fires the lifecycle steps and pushes the changes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from django.db import transaction

from marketplace import lifecycle, reports
from marketplace.models import (
    Bid,
    ChainEventRecord,
    Device,
    Payout,
    Round,
    SelectedNode,
    Task,
    TaskState,
    Update,
)
from marketplace.sync.push import TaskChange, push_on_commit
from marketplace.sync.records import MirrorEvent
from marketplace.sync.writers import WRITERS
from marketplace.sync.writers.devices import device_chain_state

log = logging.getLogger(__name__)

# Rows per query when looking rows up or writing them in bulk (SQLite caps query parameters).
BATCH = 500
BID_FIELDS = [
    "bid_index",
    "role",
    "price_per_round_wei",
    "samples",
    "deposit_wei",
    "tx_hash",
    "block_number",
]


class Mirror:
    """Applies events to the mirror rows inside one transaction.

    Tasks are cached and saved once at the end; bids and device statuses, the numerous
    events, are written in bulk by ``flush``. Everything else is written as it comes.
    """

    def __init__(self, *, block_times: dict[int, int] | None = None) -> None:
        self.writers = WRITERS
        self.block_times = block_times or {}
        self.tasks: dict[int, Task | None] = {}
        self.dirty: set[int] = set()
        self.bids: dict[tuple[int, str], dict[str, Any]] = {}
        # address -> (chain status, its latest DeviceRegistered transaction or None if unseen)
        self.devices: dict[str, tuple[str, str | None]] = {}
        self.new_events: dict[int, set[str]] = defaultdict(set)
        self.new_blocks: dict[int, set[int]] = defaultdict(set)  # where each task's new events are
        self.touched: set[int] = set()  # chain task ids whose page changed
        self.mirrored: list[reports.Work] = []  # updates and rounds devices may have reported on

    def task(self, chain_task_id: int) -> Task | None:
        if chain_task_id not in self.tasks:
            self.tasks[chain_task_id] = Task.objects.filter(chain_task_id=chain_task_id).first()
        return self.tasks[chain_task_id]

    def task_of(self, event: MirrorEvent) -> Task | None:
        """The task the event names; None (logged) when the mirror does not have it."""
        task = self.task(event.task_id)
        if task is None:
            log.warning(
                "%s in %s names task %s, which the mirror does not have; kept as a record only",
                event.name,
                event.tx_hash,
                event.task_id,
            )
        return task

    def changed(self, task: Task) -> None:
        """The task row itself changed: save it at the end, and push it."""
        self.dirty.add(task.chain_task_id)
        self.touched.add(task.chain_task_id)

    def apply(self, event: MirrorEvent, *, new: bool) -> None:
        writer = self.writers.get(event.name)
        if writer is not None:
            writer(self, event)
        if new and event.task_id is not None:
            self.new_events[event.task_id].add(event.name)
            self.new_blocks[event.task_id].add(event.block_number)

    def flush(self) -> None:
        self._flush_bids()
        self._flush_devices()
        for chain_task_id in self.dirty:
            task = self.tasks.get(chain_task_id)
            if task is not None and task.pk is not None:
                task.save()
        self.dirty.clear()

    def react(self) -> None:
        """The lifecycle steps the new events call for, from each task's state after them."""
        for chain_task_id, names in self.new_events.items():
            task = self.tasks.get(chain_task_id)
            if task is not None and task.pk is not None:
                lifecycle.task_react(task=task, new_events=names)

    def reports_on_commit(self) -> None:
        """Once the transaction commits, store the reports that came before their work."""
        if self.mirrored:
            work = list(self.mirrored)
            transaction.on_commit(lambda: reports.reports_parked_record(work), robust=True)

    def push_on_commit(self) -> None:
        push_on_commit(
            changes={
                chain_task_id: TaskChange.of_events(
                    names=self.new_events.get(chain_task_id, ()),
                    blocks=self.new_blocks.get(chain_task_id, ()),
                )
                for chain_task_id in self.touched
            }
        )

    def _flush_bids(self) -> None:
        if not self.bids:
            return
        task_pks = {pk for pk, _ in self.bids}
        existing = {(b.task_id, b.device): b for b in Bid.objects.filter(task_id__in=task_pks)}
        changed, created = [], []
        for key, values in self.bids.items():
            bid = existing.get(key)
            if bid is None:
                created.append(Bid(task_id=key[0], device=key[1], **values))
            else:
                for name in BID_FIELDS:
                    setattr(bid, name, values[name])
                changed.append(bid)
        Bid.objects.bulk_create(created, batch_size=BATCH)
        Bid.objects.bulk_update(changed, BID_FIELDS, batch_size=BATCH)
        self.bids.clear()

    def _flush_devices(self) -> None:
        for status in ("active", "revoked", "none"):
            addresses = [a for a, (s, _) in self.devices.items() if s == status]
            for i in range(0, len(addresses), BATCH):
                Device.objects.filter(address__in=addresses[i : i + BATCH]).update(
                    chain_status=status
                )
        for address, (_, registration_tx) in self.devices.items():
            if registration_tx is not None:
                Device.objects.filter(address=address).update(registration_tx=registration_tx)
        self.devices.clear()


# ---------------------------------------------------------------- re-derivation after a re-org


def devices_rederive(mirror: Mirror, addresses: set[str]) -> None:
    for address in addresses:
        mirror.devices[address] = device_chain_state(address)


def task_rederive(mirror: Mirror, chain_task_id: int) -> None:
    """Rebuild one task's mirror rows from its remaining records, in chain order; a task whose
    creation is no longer on chain is deleted (a buyer's order for it waits for its
    transaction to be mined again)."""
    task = Task.objects.filter(chain_task_id=chain_task_id).first()
    if task is None:
        return
    mirror.touched.add(chain_task_id)
    records = list(
        ChainEventRecord.objects.filter(task_id=chain_task_id).order_by("block_number", "log_index")
    )
    if not any(r.name == "TaskCreated" for r in records):
        mirror.tasks[chain_task_id] = None
        task.delete()
        return
    for model in (Bid, SelectedNode, Update, Payout):
        model.objects.filter(task=task).delete()
    task.state = TaskState.BIDDING
    task.aggregator, task.aggregator_price_wei = "", None
    task.published_rounds = 0
    task.trainers_paid_wei = task.aggregator_paid_wei = task.refunded_wei = None
    task.slashed_wei = None
    task.failure_reason = ""
    mirror.tasks[chain_task_id] = task
    for record in records:
        mirror.apply(MirrorEvent.from_record(record), new=False)
    # Rounds still published keep their rows (and the reports on them, see RoundReport).
    Round.objects.filter(task=task, number__gte=task.published_rounds).delete()
    mirror.dirty.add(chain_task_id)
