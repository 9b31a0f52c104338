"""The node's own watch on its rounds: work handed on as soon as the chain confirms it.

The platform opens a task's first round with a message (worker.train to each trainer,
worker.aggregate to the aggregator) once its chain sync has mirrored the global model. The
chain has each later round's news first, so the worker process follows it itself, from the
messages it has received: a trainer starts round r as soon as global model r is published,
and an aggregator fetches each update as its submission is mined and aggregates as soon as
the last one is in. It sends that work to the node's own queue (the one queue a device may
write to besides its reports) as the same typed message the platform sends. The platform
sends a later round's message only FLEX_ROUND_REMIND_S after the round opened, to a node that
has not acted on it by then (a task checks the chain first, so one that finds the work done
does nothing): nothing here is needed for a round to finish, it makes one finish sooner.

A websocket subscription to the contract's GlobalModelPublished logs, and UpdateSubmitted ones
where a node of the process may aggregate, rings (chain.follow); the logs themselves are read
with eth_getLogs from the last block handled up to the last one a push named.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from celery import Celery
from celery.signals import task_received
from eth_utils import to_checksum_address

from chain.client import FlexMarket
from chain.errors import ChainUnavailableError
from chain.events import (
    GlobalModelPublished,
    UpdateSubmitted,
    decode_logs,
    event_topics,
)
from chain.follow import Doorbell
from chain.node import client
from core.errors import FlexError
from core.messages import RoundAggregateRequest, RoundTrainRequest
from core.queues import route
from dataplane.client import fetch_model
from worker.node import Node

log = logging.getLogger("worker.follow")

# Without a push from the node, look this often anyway (a missed ring, a node without a
# websocket): the platform's reminders are the other safety net.
IDLE_S = 5.0
# A prefetch that does not answer in this long is left to the aggregation itself.
PREFETCH_TIMEOUT_S = 10.0
# Updates fetched side by side: each waits mostly on its trainer's data plane and on the
# disk, so the last one in starts at once instead of behind those mined before it.
PREFETCHES = 4
TRAIN, AGGREGATE = "worker.train", "worker.aggregate"


class RoundFollower:
    """Follows the rounds of ``nodes`` (served by this worker process) from the messages it
    received and the contract's events, and queues each node's next step on its own queue."""

    def __init__(self, nodes: Sequence[Node], *, app: Celery, idle_s: float = IDLE_S) -> None:
        self.nodes = {n.address.lower(): n for n in nodes}
        self.app = app
        first = next(iter(self.nodes.values()))
        # A client of its own: the node's tasks run in forked children.
        self._w3 = client(first.config.eth_rpc_url)
        self._address = to_checksum_address(first.config.contract_address)
        self._market = FlexMarket(w3=self._w3, address=self._address)
        # A process of trainers only is told of published models; updates ring only where a
        # node may aggregate (a round brings one of those and as many updates as trainers).
        followed = ["GlobalModelPublished"]
        if any(n.config.may_aggregate for n in nodes):
            followed.append("UpdateSubmitted")
        topics = event_topics()
        self._lock = threading.Lock()
        # The last message of each kind per (node, task): what the next round's message repeats.
        self._train: dict[tuple[str, int], RoundTrainRequest] = {}
        self._aggregate: dict[tuple[str, int], RoundAggregateRequest] = {}
        # Each round's submitted updates so far: trainer -> the fetch of its update.
        self._fetches: dict[tuple[int, int], dict[str, Future[None]]] = {}
        self._trainers: dict[int, int] = {}
        self._next: int | None = None
        # Apart from the look: the aggregation fetches what is left.
        self._fetcher = ThreadPoolExecutor(
            max_workers=PREFETCHES, thread_name_prefix="flex-prefetch"
        )
        self.bell = Doorbell(
            url=first.config.eth_rpc_url,
            ring=self.look,
            logs={"address": self._address, "topics": [[topics[name] for name in followed]]},
            idle_s=idle_s,
            name="flex-rounds",
        )

    # ------------------------------------------------------------ what the node was told

    def received(self, *, name: str, message: Any) -> None:
        """Remember a round message this process received (Celery's task_received)."""
        kind = {TRAIN: RoundTrainRequest, AGGREGATE: RoundAggregateRequest}.get(name)
        if kind is None:
            return
        try:
            work = kind.parse(message)
        except FlexError:
            return  # the task itself refuses it
        if work.node.lower() not in self.nodes:
            return
        orders = self._train if kind is RoundTrainRequest else self._aggregate
        key = (work.node.lower(), work.task_id)
        with self._lock:
            known = orders.get(key)
            if known is None or known.round_number <= work.round_number:
                orders[key] = work

    def _on_task_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        if request is not None:
            self.received(name=request.name, message=(request.kwargs or {}).get("message"))

    # ------------------------------------------------------------ what the chain says

    def look(self) -> None:
        """Read the round events mined since the last look and hand on what they call for."""
        after, logs = self.bell.new_logs(self._w3, from_block=self._next)
        if self._next is None:
            self._next = after  # from now on: earlier rounds came as messages
            return
        for event in decode_logs(logs, address=self._address):
            if isinstance(event, GlobalModelPublished):
                self._published(event)
            elif isinstance(event, UpdateSubmitted):
                self._update(event)
        # Only once all are handed on: a look cut short by a lost node reads them again.
        self._next = after

    def _published(self, event: GlobalModelPublished) -> None:
        """Global model ``event.round`` is out: its round is open for each trainer."""
        with self._lock:
            due = []
            for key, order in list(self._train.items()):
                if key[1] != event.task_id or order.round_number >= event.round:
                    continue
                due.append((key, order.model_copy(update={"round_number": event.round})))
                if event.round >= int(order.spec.get("rounds", 0)):
                    # The final model: nothing left to train, only the model to check.
                    del self._train[key]
            for key, order in list(self._aggregate.items()):
                if key[1] == event.task_id and event.round >= int(order.spec.get("rounds", 0)):
                    del self._aggregate[key]
            for done in [k for k in self._fetches if k[0] == event.task_id and k[1] < event.round]:
                del self._fetches[done]
        for key, order in due:
            self._send(TRAIN, order)
            # Only once sent: a broker that refused it leaves the round to the next look.
            with self._lock:
                if key in self._train and self._train[key].round_number < order.round_number:
                    self._train[key] = order

    def _update(self, event: UpdateSubmitted) -> None:
        """An update is on chain: fetch it now, in the background, and once the round has
        every one, aggregate. The aggregation is handed on once the round's fetches are
        done, so it finds the updates in the store and fetches none a second time beside
        them."""
        with self._lock:
            orders = [o for (_, t), o in self._aggregate.items() if t == event.task_id]
        for template in orders:
            order = template.model_copy(update={"round_number": event.round})
            key = (event.task_id, event.round)
            fetch = self._fetcher.submit(self._prefetch, order, event)
            with self._lock:
                fetches = self._fetches.setdefault(key, {})
                fetches[event.trainer.lower()] = fetch
                complete = len(fetches) >= self._trainer_count(event.task_id)
                after = list(fetches.values())
            if complete:
                # Queued behind the fetches it waits for: they have a thread by then.
                self._fetcher.submit(self._hand_on, order, after=after)

    def _hand_on(self, order: RoundAggregateRequest, *, after: Sequence[Future[None]]) -> None:
        wait(after)
        try:
            self._send(AGGREGATE, order)
        except Exception as exc:  # a thread of its own: the platform's reminder still comes
            log.warning(
                "task %s: round %s not handed on: %s", order.task_id, order.round_number, exc
            )

    def _trainer_count(self, task_id: int) -> int:
        if task_id not in self._trainers:
            selection = self._market.selection(task_id=task_id)
            self._trainers[task_id] = len(selection.trainers) if selection else 0
        return self._trainers[task_id] or 1 << 30

    def _prefetch(self, order: RoundAggregateRequest, event: UpdateSubmitted) -> None:
        node = self.nodes[order.node.lower()]
        if node.store.has(event.model_id):
            return
        urls = {k.lower(): v for k, v in order.trainer_urls.items()}
        certs = {k.lower(): v for k, v in order.trainer_certs_sha256.items()}
        trainer = event.trainer.lower()
        if trainer not in urls or trainer not in certs:
            return
        try:
            blob = fetch_model(
                base_url=urls[trainer],
                cert_sha256=certs[trainer],
                model_id=event.model_id,
                server_address=event.trainer,
                account=node.account,
                max_bytes=node.config.max_model_bytes,
                timeout=PREFETCH_TIMEOUT_S,
                retries=0,
            )
            node.store.put(blob, expected_id=event.model_id)
        except FlexError as exc:
            # The aggregation fetches it again, and leaves it out if it still cannot.
            log.info("task %s: update of %s not fetched yet: %s", event.task_id, trainer, exc)
        except Exception:  # a thread of its own: say why, and let the aggregation fetch it
            log.exception("task %s: prefetch of %s's update failed", event.task_id, trainer)

    def _send(self, name: str, work: RoundTrainRequest | RoundAggregateRequest) -> None:
        queue = self.nodes[work.node.lower()].config.queues[0]
        self.app.send_task(name, kwargs={"message": work.dump()}, **route(queue))
        log.info(
            "task %s: round %s handed on to %s as soon as the chain had it",
            work.task_id,
            work.round_number,
            name,
        )

    # ------------------------------------------------------------ running

    def start(self) -> RoundFollower:
        task_received.connect(self._on_task_received, weak=False)
        try:
            self.look()  # the cursor starts at the head: what follows is new
        except ChainUnavailableError as exc:
            log.warning("rounds not followed from the chain yet: %s", exc.message)
        self.bell.start()
        return self

    def stop(self) -> None:
        self.bell.stop()
        self._fetcher.shutdown(wait=False, cancel_futures=True)
        task_received.disconnect(self._on_task_received)
