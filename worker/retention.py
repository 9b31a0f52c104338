"""What a node's model store keeps of the tasks that are over.

Once a task is settled on chain (finalized, aborted, failed or cancelled), every dispute
window it had has closed, and nothing on chain depends on its blobs any more
(docs/contract.md, "Who must keep what, and for how long"). The node keeps them for
FLEX_STORE_KEEP_DAYS more, counted from the newest blob it stored for the task, so that its
rounds can still be audited with the provenance command; then deletes them. One model stays
as long as the store does: a finalized task's final model on its aggregator, which the
task's buyer downloads from there whenever they ask for it.

The worker process looks at its nodes' stores when it starts and every SWEEP_S seconds after.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from chain.client import FlexMarket
from chain.enums import TaskState
from chain.errors import ChainUnavailableError
from chain.node import chain_id
from core.env import env_number
from training.store import ModelStore
from worker.node import Node

log = logging.getLogger("worker.retention")

KEEP_DAYS = env_number("FLEX_STORE_KEEP_DAYS", 30, what="whole days")
DAY_S = 86_400
SWEEP_S = 3600.0
SETTLED = frozenset({TaskState.FINALIZED, TaskState.ABORTED, TaskState.FAILED, TaskState.CANCELLED})


@dataclass(frozen=True)
class Pruned:
    """The models deleted of one settled task, and the bytes that freed."""

    task_id: int
    state: TaskState
    models: int
    freed_bytes: int

    def __str__(self) -> str:
        return (
            f"task {self.task_id} ({self.state.name.lower()}): deleted {self.models} model(s), "
            f"{self.freed_bytes:,} bytes"
        )


def prune(
    *,
    store: ModelStore,
    market: FlexMarket,
    node: str,
    keep_s: float,
    now: float | None = None,
) -> list[Pruned]:
    """Delete from ``store`` (node ``node``'s) the blobs of each task of ``market`` that is
    settled on chain and whose newest blob is at least ``keep_s`` seconds older than ``now``,
    but for the final model of a finalized task ``node`` aggregated. A task the chain does
    not know, or one still bidding, running or in its dispute windows, keeps everything."""
    now = time.time() if now is None else now
    deployment = {"chain_id": chain_id(market.w3), "contract": market.address}
    held = store.tasks(**deployment)
    count = market.task_count()
    due = sorted(
        t for t, newest in held.items() if 1 <= t <= count and newest.timestamp() <= now - keep_s
    )
    infos = market.at_once(*(lambda t=t: market.task(task_id=t) for t in due)) if due else []
    pruned = []
    for task_id, task in zip(due, infos, strict=True):
        if task.state not in SETTLED:
            continue
        kept_final = task.state == TaskState.FINALIZED and task.aggregator.lower() == node.lower()
        blobs = [
            b
            for b in store.list(**deployment, task_id=task_id)
            if not (kept_final and b.kind == "global" and b.round_number == task.rounds)
        ]
        if blobs:
            freed = store.remove(b.model_id for b in blobs)
            pruned.append(
                Pruned(task_id=task_id, state=task.state, models=len(blobs), freed_bytes=freed)
            )
    return pruned


class StoreKeeper:
    """Prunes ``nodes``' stores (``prune``) at start and every ``interval`` seconds, in a
    thread of its own."""

    def __init__(
        self, nodes: Sequence[Node], *, keep_days: int = KEEP_DAYS, interval: float = SWEEP_S
    ) -> None:
        self.nodes = list(nodes)
        self.keep_days = keep_days
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> list[Pruned]:
        done = []
        for node in self.nodes:
            for gone in prune(
                store=node.store,
                market=node.market,
                node=node.address,
                keep_s=self.keep_days * DAY_S,
            ):
                log.info(
                    "%s: %s, settled and kept %d day(s) since its last model",
                    node.config.name,
                    gone,
                    self.keep_days,
                )
                done.append(gone)
        return done

    def _run(self) -> None:
        first = True
        while True:
            try:
                done = self.sweep()
                if first:
                    log.info(
                        "model stores looked after: a settled task's models go %d day(s) after "
                        "its last (%d task(s) deleted now)",
                        self.keep_days,
                        len(done),
                    )
                    first = False
            except ChainUnavailableError as exc:
                log.warning("stores not pruned this time: %s", exc.message)
            except Exception:  # a thread of its own: say why, and look again next time
                log.exception("pruning the stores failed")
            if self._stop.wait(self.interval):
                return

    def start(self) -> StoreKeeper:
        self._thread = threading.Thread(target=self._run, name="flex-store-keeper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
