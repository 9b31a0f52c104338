"""A trainer's watch over the global models it takes part in, and the proofs it sends.

A trainer holds the global model of each round it trains from (and the final one); the
updates it aggregated are on the aggregator's data plane, which serves single chunks of them
to the task's parties. A sampled check (dataplane.audit.check_round) that finds a value that
differs, or an included update whose header does not name its trainer, this task and this
round, makes the challenge that proves it on chain; an own update left out for no reason or
a false checkable one makes the contest that shows it (docs/verifiable.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from eth_account.signers.local import LocalAccount

from chain.client import FlexMarket
from chain.errors import ContractError, ExclusionHoldsError
from chain.events import ExclusionContested, Reason
from chain.fraud import ZERO_ID, Contest, Exclusion
from chain.records import RoundInfo, TaskInfo
from dataplane.audit import Aggregator, Watch, check_round, openings
from dataplane.protocol import DataPlaneError
from training.serialize import ModelBlob
from training.spec import TaskSpec
from training.store import ModelStore

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# How much lower than training and aggregation a check runs (Linux nice levels, for the
# checking thread alone): it has the dispute window to finish in, while the round in
# progress waits for its slowest trainer and for the aggregator, on whatever cores they
# share with it.
CHECK_NICENESS = 10

_checker: tuple[int, ThreadPoolExecutor] | None = None
# What this process's checks found (dataplane.audit.check_round's memo): a host that serves
# several trainers of a task checks each of its rounds once between them, not once each.
_checked: dict = {}


def yielding(check: Callable[P, T]) -> Callable[P, T]:
    """``check``, run and waited for in this process's checking thread, which yields the
    CPU to everything else in its scheduling group that runs at normal priority: the rest
    of this process, and of its session where Linux groups processes by session (autogroup;
    docs/verifiable.md). One thread per process, kept:
    the data plane keeps its connection to the aggregator per thread (a forked child makes
    its own)."""

    @functools.wraps(check)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        global _checker
        if _checker is None or _checker[0] != os.getpid():
            _checker = (
                os.getpid(),
                ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="flex-check", initializer=_lower_priority
                ),
            )
        return _checker[1].submit(check, *args, **kwargs).result()

    return run


def _lower_priority() -> None:
    # On Linux a thread has a nice level of its own, set through its thread ID; elsewhere
    # the check runs at the process's priority.
    with contextlib.suppress(OSError, AttributeError):
        thread = threading.get_native_id()
        os.setpriority(
            os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + CHECK_NICENESS
        )


def watch_round(
    *,
    market: FlexMarket,
    store: ModelStore,
    account: LocalAccount,
    spec: TaskSpec,
    task_id: int,
    round_number: int,
    published: ModelBlob,
    aggregator: Aggregator,
    info: RoundInfo,
    task: TaskInfo | None = None,
) -> Watch | None:
    """A trainer's watch over global model ``round_number + 1``, which it fetched to train
    from (``info``: round ``round_number`` on chain; ``task``: the task as just read, if it
    was): check it and, when it is wrong, send the challenge that proves it (the bond's
    bounty comes to this node). None when the check could not be made (an update's chunk
    not served): the round then stays unproven either way, and that is logged. A round
    another node of this process has checked is not fetched and checked again: its
    finding holds for every node (what it depends on is on chain, and the blobs were
    checked against their IDs there)."""
    try:
        watch = check_round(
            info=info,
            market=market,
            store=store,
            account=account,
            spec=spec,
            task_id=task_id,
            round_number=round_number,
            published=published,
            aggregator=aggregator,
            task=task,
            memo=_checked,
        )
    except DataPlaneError as exc:
        log.warning(
            "task %s: cannot check global model of round %s: %s (%s)",
            task_id,
            round_number + 1,
            exc.message,
            exc.code,
        )
        return None
    if watch.challenge is None:
        return watch
    try:
        tx = market.challenge(
            sender=account,
            task_id=task_id,
            round_number=round_number + 1,
            challenge=watch.challenge,
        )
    except ContractError as exc:
        # Someone else's challenge came first, or the window closed: nothing left to prove.
        log.warning(
            "task %s: challenge of round %s refused: %s (%s)",
            task_id,
            round_number + 1,
            exc.message,
            exc.code,
        )
        return watch
    log.warning(
        "task %s: challenged global model %s of round %s at chunk %s, value %s in %s: "
        "aggregator slashed",
        task_id,
        watch.global_model,
        round_number + 1,
        watch.challenge.chunk,
        watch.challenge.offset,
        tx.tx_hash,
    )
    return watch


def watch_exclusion(
    *,
    market: FlexMarket,
    store: ModelStore,
    account: LocalAccount,
    task_id: int,
    round_number: int,
    published: ModelBlob,
    aggregator: Aggregator,
    info: RoundInfo,
    position: int,
) -> ExclusionContested | None:
    """A trainer's (at selection ``position``) watch over the reason global model
    ``round_number + 1`` (``published``) gives for leaving out its update of ``round_number``
    (``info``: that round on chain): when it was left out for no reason or a checkable one,
    contest it. The chain judges: the contest is estimated first, so one whose reason holds
    reverts (ExclusionHoldsError) before anything is sent. NOT_FETCHABLE cannot be checked
    on chain and is only logged. Returns the contest's event when it slashed the
    aggregator, else None."""
    if (info.aggregated_mask >> position) & 1:
        return None
    own = market.update_of(task_id=task_id, round_number=round_number, trainer=account.address)
    if own is None or not store.has(own):
        return None
    statement = market.exclusions_of(task_id=task_id, round_number=round_number + 1)
    stated = {e.position: e for e in Exclusion.decode_all(statement)}.get(position)
    reason = stated.reason if stated else Reason.UNSTATED
    if not reason.checkable:
        log.warning(
            "task %s: update %s left out of round %s as not fetchable; the chain cannot check it",
            task_id,
            own,
            round_number + 1,
        )
        return None
    evidence = None
    if stated and reason == Reason.COPIED and market.model_origin(model_id=stated.evidence):
        try:
            [[evidence]] = openings(store, account, aggregator, [stated.evidence], [0])
        except DataPlaneError as exc:
            log.warning("task %s: copied model %s not served: %s", task_id, stated.evidence, exc)
    contest = Contest.of(
        update_id=own,
        update=store.opening(own, 0),
        global_model=published.opening(0),
        evidence_id=stated.evidence if stated and evidence else ZERO_ID,
        evidence=evidence,
    )
    try:
        tx = market.contest_exclusion(
            sender=account,
            task_id=task_id,
            round_number=round_number + 1,
            statement=statement,
            contest=contest,
        )
    except ExclusionHoldsError:
        log.info(
            "task %s: update %s rightly left out of round %s (%s)",
            task_id,
            own,
            round_number + 1,
            reason.name,
        )
        return None
    except ContractError as exc:
        log.warning(
            "task %s: contest of round %s refused: %s (%s)",
            task_id,
            round_number + 1,
            exc.message,
            exc.code,
        )
        return None
    log.warning(
        "task %s: update %s left out of round %s for %s: contested in %s, aggregator slashed",
        task_id,
        own,
        round_number + 1,
        reason.name,
        tx.tx_hash,
    )
    return tx.first(ExclusionContested)
