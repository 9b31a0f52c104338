"""Following the chain as it grows: a websocket subscription rings a doorbell when the node has
something new, and the caller reads what is new over JSON-RPC as usual (eth_getLogs from the
last block it handled).

The subscription only says *when* to look, never *what* happened: a ring missed while the
node restarted, or the websocket was down, is caught up by the next look, which starts from
the caller's own cursor. So the doorbell also rings on every (re)connection and at least every
``idle_s`` seconds whatever the node says, and keeps ringing at that pace through a node that
has no websocket at all (a slow poll instead of a push).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from websockets.exceptions import InvalidHandshake, InvalidURI, WebSocketException
from websockets.sync.client import connect

from chain.errors import ChainUnavailableError
from chain.events import get_logs
from chain.node import reachable

if TYPE_CHECKING:
    from web3 import Web3

log = logging.getLogger(__name__)

# Reconnection back-off: a restarting node is back within seconds.
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 2.0
# How long a subscription request may take to be answered.
SUBSCRIBE_TIMEOUT_S = 10.0
# Linux's option to acknowledge what has arrived at once (None elsewhere).
QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class SubscriptionRefusedError(Exception):
    """The node answered eth_subscribe with an error (it has no such subscription)."""


def ws_url(rpc_url: str) -> str:
    """The websocket URL of a JSON-RPC node served at ``rpc_url`` on the same host and port,
    as Anvil and geth serve both (http -> ws, https -> wss; a ws URL is kept)."""
    parts = urlsplit(rpc_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, ""))


class Doorbell:
    """Calls ``ring()`` from a thread of its own after each new block (``logs`` None: the
    node's newHeads) or each new log matching ``logs`` (eth_subscribe's log filter: address,
    topics), on every (re)connection, and at least every ``idle_s`` seconds. Rings that arrive
    while ``ring()`` runs are answered by one more call, never by two calls at once, and so
    are those that arrive within ``spacing_s`` of the last call's start: a burst of blocks is
    looked at once, at most ``spacing_s`` late. An exception from ``ring()`` is logged and
    the doorbell goes on.
    """

    def __init__(
        self,
        *,
        url: str,
        ring: Callable[[], Any],
        logs: dict[str, Any] | None = None,
        idle_s: float = 5.0,
        spacing_s: float = 0.0,
        name: str = "flex-chain-doorbell",
    ) -> None:
        self.url = ws_url(url)
        self.ring = ring
        self.logs = logs
        self.idle_s = idle_s
        self.spacing_s = spacing_s
        self.name = name
        self._last_call = -math.inf
        self._head: int | None = None
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ws: Any = None

    @property
    def head(self) -> int | None:
        """The highest block the pushes of the current subscription have named (a new head,
        or the block of a log), None until its first push. A ring answering a push can read
        up to it without asking the node for its head: a block it holds later is pushed too,
        and a lost subscription starts again from None."""
        return self._head

    def new_logs(self, w3: Web3, *, from_block: int | None) -> tuple[int, list[Mapping[str, Any]]]:
        """The logs of this doorbell's log filter from ``from_block`` up to the head (the
        last block a push named, else the node's), as the node sends them, and the caller's
        next ``from_block``. ``from_block`` None: none, and the block after the head (what is
        mined from now on). A lost node raises ChainUnavailableError."""
        with reachable():
            head = w3.eth.block_number if self._head is None else self._head
            if from_block is None or head < from_block:
                return (head + 1 if from_block is None else from_block), []
            logs = get_logs(
                w3,
                address=self.logs["address"],
                from_block=from_block,
                to_block=head,
                topics=self.logs.get("topics", ()),
            )
        return head + 1, logs

    def _note(self, message: str | bytes) -> None:
        try:
            pushed = json.loads(message)["params"]["result"]
            if pushed.get("removed"):
                return  # a log of a block no longer in the chain
            number = int(pushed.get("blockNumber") or pushed["number"], 16)
        except (ValueError, KeyError, TypeError, AttributeError):
            return  # not a push this reads: the ring asks the node
        if self._head is None or number > self._head:
            self._head = number

    def start(self) -> Doorbell:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):  # wakes a wait on the socket now
                ws.close()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    # ------------------------------------------------------------ the thread

    def _call(self) -> None:
        self._last_call = time.monotonic()
        try:
            self.ring()
        except ChainUnavailableError as exc:
            log.warning("%s: %s; looking again on the next ring", self.name, exc.message)
        except Exception:
            log.exception(
                "%s: looking at the chain failed; looking again on the next ring", self.name
            )

    def _subscribe(self, ws: Any) -> None:
        params: list[Any] = ["newHeads"] if self.logs is None else ["logs", self.logs]
        ws.send(
            json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_subscribe", "params": params})
        )
        answer = json.loads(ws.recv(timeout=SUBSCRIBE_TIMEOUT_S))
        if "error" in answer or "result" not in answer:
            raise SubscriptionRefusedError(str(answer.get("error", answer))[:200])

    def _listen(self, ws: Any) -> None:
        while not self._stop.is_set():
            try:
                self._note(ws.recv(timeout=self.idle_s))
                _acknowledge(ws)
            except TimeoutError:
                pass  # nothing pushed for a while: look anyway (a ring may have been lost)
            else:
                # Rings queued while the last look ran, or within its spacing, are all
                # answered by the next one.
                early = self._last_call + self.spacing_s - time.monotonic()
                if early > 0 and self._stop.wait(early):
                    break
                try:
                    while True:
                        self._note(ws.recv(timeout=0))
                except TimeoutError:
                    _acknowledge(ws)
            if not self._stop.is_set():
                self._call()

    def _run(self) -> None:
        delay = RECONNECT_MIN_S
        warned = False
        while not self._stop.is_set():
            try:
                with connect(self.url, open_timeout=5, close_timeout=1, max_size=2**22) as ws:
                    self._ws = ws
                    self._subscribe(ws)
                    self.connected.set()
                    if warned:
                        log.info("%s: subscribed again at %s", self.name, self.url)
                    delay, warned = RECONNECT_MIN_S, False
                    self._call()  # whatever was mined while nobody listened
                    self._listen(ws)
            except (OSError, TimeoutError, WebSocketException, InvalidURI, InvalidHandshake,
                    SubscriptionRefusedError, ValueError) as exc:  # fmt: skip
                self.connected.clear()
                self._head = None  # what the lost subscription pushed may be gone too
                if self._stop.is_set():
                    break
                if not warned:
                    log.warning(
                        "%s: no subscription at %s (%s); looking every %.1f s until there is",
                        self.name,
                        self.url,
                        exc,
                        RECONNECT_MAX_S,
                    )
                    warned = True
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, RECONNECT_MAX_S)
                self._call()
        self.connected.clear()


def _acknowledge(ws: Any) -> None:
    """Acknowledge the pushes received so far now, rather than when Linux's delayed
    acknowledgement comes due (up to 40 ms later): a node that writes with Nagle's algorithm
    on, as Anvil does, holds its next small push until the last one is acknowledged, and so
    a block mined a few milliseconds after another reached this end up to 40 ms late. The
    kernel goes back to delaying on its own, so this is asked again after each push."""
    if QUICKACK is not None:
        with contextlib.suppress(OSError, AttributeError):
            ws.socket.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
