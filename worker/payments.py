"""The worker's log line for each payment its nodes receive: the contract's PaymentCredited
events for their addresses, read from the chain as they are mined."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from eth_utils import to_checksum_address

from chain.errors import ChainUnavailableError
from chain.events import PaymentCredited, decode_logs, event_topics, get_logs
from chain.node import connect, reachable
from core.units import wei_to_eth
from worker.node import Node

log = logging.getLogger("worker.payments")

POLL_S = 5.0


class PaymentWatcher:
    """Logs every payment credited to ``nodes`` from the block it starts at; ``poll()`` reads
    what was mined since the last call (a thread calls it every ``interval`` seconds)."""

    def __init__(self, nodes: Sequence[Node], *, interval: float = POLL_S) -> None:
        self.nodes = {n.address.lower(): n for n in nodes}
        self.interval = interval
        first = next(iter(self.nodes.values()))
        # A connection of its own: the node's tasks run in forked children, and a connection
        # shared with this thread could be copied mid-request.
        self._w3 = connect(first.config.eth_rpc_url)
        self._market = to_checksum_address(first.config.contract_address)
        self._next: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> list[PaymentCredited]:
        w3, market = self._w3, self._market
        with reachable():
            head = w3.eth.block_number
            if self._next is None:
                self._next = head + 1
                return []
            if head < self._next:
                return []
            topic = event_topics()["PaymentCredited"]
            accounts = ["0x" + address[2:].rjust(64, "0") for address in self.nodes]
            logs = get_logs(
                w3, address=market, from_block=self._next, to_block=head, topics=[topic, accounts]
            )
        self._next = head + 1
        paid = [e for e in decode_logs(logs, address=market) if isinstance(e, PaymentCredited)]
        for event in paid:
            owner = self.nodes[event.account.lower()]
            log.info(
                "%s was paid %s ETH (%s wei, %s) for task %s in %s; withdraw with "
                "`python -m worker withdraw --home %s`",
                owner.config.name,
                wei_to_eth(event.amount_wei),
                event.amount_wei,
                event.reason.name.lower().replace("_", " "),
                event.task_id,
                event.tx_hash,
                owner.home,
            )
        return paid

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except ChainUnavailableError as exc:
                log.warning("payments not read this time: %s", exc.message)

    def start(self) -> PaymentWatcher:
        try:
            self.poll()  # from now on: earlier payments are in `python -m worker status`
        except ChainUnavailableError as exc:
            log.warning("payments not read this time: %s", exc.message)
        self._thread = threading.Thread(target=self._run, name="flex-payments", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling, after a last look: a payment mined just before shutdown is logged."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 30)
        try:
            self.poll()
        except ChainUnavailableError as exc:
            log.warning("payments not read this time: %s", exc.message)
