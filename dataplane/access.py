"""Who may fetch which blob from a node: the Policy interface and FlexMarket's rules."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from eth_utils import to_checksum_address

from chain.client import FlexMarket
from chain.errors import UnknownTaskError
from chain.events import TaskState
from dataplane.protocol import AccessDeniedError
from training.serialize import id_hex
from training.store import StoredModel


class Policy(Protocol):
    """Who may fetch which blob from this node."""

    def authorize_fetch(self, *, requester: str, meta: StoredModel) -> None:
        """Return if ``requester`` (checksummed) may fetch the blob; raise AccessDeniedError."""
        ...

    def authorize_opening(self, *, requester: str, meta: StoredModel) -> None:
        """Return if ``requester`` may fetch single chunks of the blob (with their proofs)."""
        ...


class AllowListPolicy:
    """A fixed set of addresses may fetch every blob: for tests and single-owner setups."""

    def __init__(self, *, addresses: Iterable[str]) -> None:
        self.addresses = frozenset(to_checksum_address(a) for a in addresses)

    def authorize_fetch(self, *, requester: str, meta: StoredModel) -> None:
        if to_checksum_address(requester) not in self.addresses:
            raise AccessDeniedError(
                requester=requester, model_id=id_hex(meta.model_id), reason="not on the allow list"
            )

    authorize_opening = authorize_fetch


@dataclass(frozen=True)
class _Parties:
    """Who a task involves, as read from the chain; ``aggregator`` None before selection."""

    buyer: str
    state: TaskState
    aggregator: str | None
    trainers: frozenset[str]


class ChainPolicy:
    """FlexMarket's access rules for model blobs, read from the chain.

    A device's UPDATE goes whole only to its task's selected aggregator; a task's GLOBAL
    models go to its buyer, its aggregator and its selected trainers. Single chunks of an
    update, with their proofs, go to the same parties as the global models: that is what they
    need to check an aggregate, a chunk at a time, and to prove it wrong on chain. A selected
    device must also still be active in the device registry. Chain answers are reused for
    ``ttl`` seconds, so a revoked device loses access at most ``ttl`` seconds after its
    revocation is mined (and a newly selected one gains it as late). An unreadable chain
    raises ChainUnavailableError: the server then answers 503 and refuses the blob (fail
    closed).
    """

    def __init__(
        self,
        *,
        market: FlexMarket,
        ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.market = market
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        # Bounded by what is asked: tasks of blobs in this store, and selected devices only.
        self._tasks: dict[int, tuple[float, _Parties | None]] = {}
        self._devices: dict[str, tuple[float, bool]] = {}

    def authorize_fetch(self, *, requester: str, meta: StoredModel) -> None:
        self._authorize(requester=requester, meta=meta, whole=True)

    def authorize_opening(self, *, requester: str, meta: StoredModel) -> None:
        self._authorize(requester=requester, meta=meta, whole=False)

    def _authorize(self, *, requester: str, meta: StoredModel, whole: bool) -> None:
        requester = to_checksum_address(requester)
        task_id = meta.task_id

        def deny(reason: str) -> AccessDeniedError:
            return AccessDeniedError(
                requester=requester,
                model_id=id_hex(meta.model_id),
                reason=reason,
                task_id=task_id,
                kind=meta.kind,
            )

        if task_id is None or meta.kind not in ("global", "update"):
            raise deny("the blob is not indexed as a task's global model or update")
        parties = self._parties(task_id)
        if parties is None:
            raise deny(f"task {task_id} does not exist on chain")
        if parties.aggregator is None:
            raise deny(f"task {task_id} has no selected nodes ({parties.state.name.lower()})")
        if meta.kind == "update" and whole:
            if requester != parties.aggregator:
                raise deny(
                    f"only task {task_id}'s aggregator {parties.aggregator} may fetch its updates"
                )
        elif requester == parties.buyer:
            return
        elif requester != parties.aggregator and requester not in parties.trainers:
            what = "its global models" if meta.kind == "global" else "chunks of its updates"
            raise deny(
                f"only task {task_id}'s buyer, aggregator and selected trainers may fetch {what}"
            )
        if not self._active(requester):
            raise deny(f"device {requester} is revoked in the device registry")

    def _parties(self, task_id: int) -> _Parties | None:
        cached = self._cached(self._tasks, task_id)
        if cached is not _MISS:
            return cached
        try:
            task = self.market.task(task_id=task_id)
        except UnknownTaskError:
            parties = None
        else:
            selection = self.market.selection(task_id=task_id)
            parties = _Parties(
                buyer=to_checksum_address(task.buyer),
                state=task.state,
                aggregator=to_checksum_address(selection.aggregator) if selection else None,
                trainers=frozenset(selection.trainers) if selection else frozenset(),
            )
        return self._store(self._tasks, task_id, parties)

    def _active(self, device: str) -> bool:
        cached = self._cached(self._devices, device)
        if cached is not _MISS:
            return cached
        return self._store(self._devices, device, self.market.device(device=device).active)

    def _cached(self, cache: dict[Any, tuple[float, Any]], key: Any) -> Any:
        with self._lock:
            entry = cache.get(key)
        if entry is None or entry[0] <= self.clock():
            return _MISS
        return entry[1]

    def _store(self, cache: dict[Any, tuple[float, Any]], key: Any, value: Any) -> Any:
        with self._lock:
            cache[key] = (self.clock() + self.ttl, value)
        return value


_MISS = object()
