"""The task lifecycle the platform drives from the mirror: who is asked to do what, and when.

Two kinds of steps. Device messages (bid, publish the initial model, train and aggregate a
round) follow newly mirrored events: chain sync calls ``task_react`` inside the transaction
that mirrors them; the step is recorded as a LifecycleAction (once per task, action and
round) and its Celery messages leave when that transaction commits. Platform transactions
(select nodes, finalize, abort) follow chain time: the beat's ``deadlines_check`` queues them
and each checks the chain again, under the platform account's lock, before it sends.

Every step is safe to fire twice: the LifecycleAction row or the chain state stops a second
one here, and the worker tasks check the chain before acting on a redelivered message.
Celery tasks are addressed by name and queue only (the worker never imports marketplace), and
each takes one typed message (core.messages) naming this deployment; ``task_id`` in every
message is the contract's task id.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

from celery import Celery, current_app
from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, QuerySet, Subquery

from chain.client import FlexMarket
from chain.errors import (
    BiddingOpenError,
    DeadlineNotPassedError,
    DisputeWindowOpenError,
    InvalidTaskStateError,
    NoBidError,
)
from chain.events import TaskState as ChainTaskState
from chain.node import chain_time
from chain.records import TxResult
from core.messages import (
    BidRequest,
    InitialModelRequest,
    Message,
    RoundAggregateRequest,
    RoundStep,
    RoundTrainRequest,
    TaskStep,
)
from core.queues import PLATFORM_QUEUE, device_queue, route
from marketplace import contract
from marketplace.models import (
    Device,
    LifecycleAction,
    Role,
    Round,
    SelectedNode,
    Task,
    TaskState,
    Update,
)

log = logging.getLogger(__name__)

Action = LifecycleAction.Action

# The Celery app messages leave through: the process's current app (flexsite's) unless set
# here; tests and benches point it at a broker database of their own.
celery_app: Celery | None = None


# ---------------------------------------------------------------- plumbing


def dispatch(name: str, *, queue: str, message: Message, countdown: float | None = None) -> None:
    """Send ``message`` to the Celery task ``name`` on ``queue`` once the current transaction
    commits (at once outside one), to run ``countdown`` seconds after that when given. A
    broker failure then is logged: the commit stands."""
    send = (celery_app or current_app).send_task
    options = route(queue) if countdown is None else {**route(queue), "countdown": countdown}
    body = {"message": message.dump()}

    # A function of its own, not a functools.partial: Django logs a robust hook's failure
    # under the hook's __qualname__, which a partial lacks (the log call would raise instead).
    def send_step() -> None:
        send(name, kwargs=body, **options)

    transaction.on_commit(send_step, robust=True)


def task_spec(task: Task) -> dict | None:
    """The task's spec as the worker tasks take it, from the buyer's order whose spec hashes
    to what the chain has; None when the platform does not know it (a task created on chain
    outside the website, or its order not written yet: the beat asks again)."""
    order = task.order
    if order is None or order.spec_hash.lower() != task.spec_hash.lower():
        return None
    return order.spec or None


def devices_eligible() -> QuerySet[Device]:
    """Enrolled devices that may be asked to bid: not revoked on chain."""
    return Device.objects.exclude(chain_status="revoked")


def _devices_by_address(addresses: Iterable[str]) -> dict[str, Device]:
    return {d.address.lower(): d for d in Device.objects.filter(address__in=list(addresses))}


def _claim(
    task: Task, action: str, *, round_number: int = 0, tx_hash: str = "", detail: dict
) -> LifecycleAction | None:
    """Record the step; None if it was recorded before (it fired already)."""
    row, created = LifecycleAction.objects.get_or_create(
        task=task,
        action=action,
        round_number=round_number,
        defaults={"tx_hash": tx_hash, "detail": detail},
    )
    return row if created else None


def _fired(task: Task, action: str, round_number: int = 0) -> bool:
    return LifecycleAction.objects.filter(
        task=task, action=action, round_number=round_number
    ).exists()


def _time_reached(market: FlexMarket, timestamp: int, *, after: bool = False) -> bool:
    """Whether a transaction sent now runs at ``timestamp`` or later (later still, with
    ``after``): the client estimates and the node mines it at the chain's pending time."""
    now = chain_time(market.w3)
    return now > timestamp if after else now >= timestamp


# ---------------------------------------------------------------- device messages


@transaction.atomic
def task_notify_devices(*, task: Task) -> LifecycleAction | None:
    """Ask every eligible device to bid (worker.bid on its own queue); each decides
    from its own policy. Only for tasks whose spec the platform knows."""
    spec = task_spec(task)
    if spec is None or _fired(task, Action.NOTIFY_BIDS):
        return None
    devices = list(devices_eligible())
    action = _claim(
        task,
        Action.NOTIFY_BIDS,
        tx_hash=task.created_tx,
        detail={"devices": [d.address for d in devices]},
    )
    if action is None:
        return None
    deployment = contract.deployment_identity()
    for device in devices:
        dispatch(
            "worker.bid",
            queue=device_queue(device.pk),
            message=BidRequest.of(
                deployment, node=device.address, task_id=task.chain_task_id, spec=spec
            ),
        )
    log.info("task %s: %d device(s) asked to bid", task.chain_task_id, len(devices))
    return action


@transaction.atomic
def task_publish_initial(*, task: Task) -> LifecycleAction | None:
    """Ask the selected aggregator to publish the round-0 model (worker.publish_initial)."""
    spec = task_spec(task)
    if spec is None or _fired(task, Action.PUBLISH_INITIAL):
        return None
    selected = SelectedNode.objects.filter(task=task, role=Role.AGGREGATOR).first()
    if selected is None:
        return None
    aggregator = _devices_by_address([selected.device]).get(selected.device.lower())
    missing = [] if aggregator else [selected.device]
    action = _claim(
        task, Action.PUBLISH_INITIAL, tx_hash=selected.tx_hash, detail={"missing": missing}
    )
    if action is None:
        return None
    if aggregator is None:
        log.warning(
            "task %s: aggregator %s is not an enrolled device (no queue); "
            "it was not asked for the initial model",
            task.chain_task_id,
            selected.device,
        )
        return action
    dispatch(
        "worker.publish_initial",
        queue=device_queue(aggregator.pk),
        message=InitialModelRequest.of(
            contract.deployment_identity(),
            node=aggregator.address,
            task_id=task.chain_task_id,
            spec=spec,
        ),
    )
    log.info("task %s: aggregator %s asked for the initial model", task.chain_task_id, aggregator)
    return action


@transaction.atomic
def task_round_start(*, task: Task, round_number: int) -> LifecycleAction | None:
    """Open round ``round_number``: worker.train to each selected trainer (fetching the
    global model from the aggregator's data plane) and worker.aggregate to the aggregator
    (fetching the updates from the trainers'), which waits for the updates. For the final
    model the trainers only check it and the aggregator has nothing to do.

    The first round's messages, and the final model's, go at once: they tell each node the
    task it follows. A later round the nodes start by themselves as soon as the chain has its
    global model (worker.follow), so its messages wait FLEX_ROUND_REMIND_S and then go only
    to the nodes that have not acted on it (``task_round_remind``): a node whose follower
    missed the round, or was restarted and knows no task yet."""
    spec = task_spec(task)
    if spec is None or _fired(task, Action.START_ROUND, round_number):
        return None
    published = Round.objects.filter(task=task, number=round_number).first()
    nodes = list(SelectedNode.objects.filter(task=task).order_by("position"))
    if published is None or not nodes:
        return None
    devices = _devices_by_address(n.device for n in nodes)
    missing = [n.device for n in nodes if n.device.lower() not in devices]
    action = _claim(
        task,
        Action.START_ROUND,
        round_number=round_number,
        tx_hash=published.tx_hash,
        detail={"missing": missing},
    )
    if action is None:
        return None
    for address in missing:
        log.warning(
            "task %s: selected node %s is not an enrolled device (no queue); "
            "it was not told that round %s opened",
            task.chain_task_id,
            address,
            round_number,
        )
    if 1 <= round_number < task.rounds:
        dispatch(
            "marketplace.round_remind",
            queue=PLATFORM_QUEUE,
            message=RoundStep.of(
                contract.deployment_identity(),
                task_id=task.chain_task_id,
                round_number=round_number,
            ),
            countdown=settings.FLEX_ROUND_REMIND_S,
        )
        return action
    told = _round_messages(task, spec=spec, round_number=round_number, nodes=nodes, devices=devices)
    log.info("task %s: round %s opened for %d node(s)", task.chain_task_id, round_number, len(told))
    return action


def task_round_remind(*, task_id: int, round_number: int) -> list[str] | None:
    """Round ``round_number``'s messages, to the nodes that have not acted on it: each
    selected trainer whose update the mirror does not have, and the aggregator while the
    round is open (it waits for the updates, and closes a round a trainer left at its
    deadline). None when the round is no longer open; else the addresses told."""
    task = Task.objects.filter(chain_task_id=task_id).first()
    if task is None or task.state != TaskState.RUNNING:
        return None
    if task.published_rounds != round_number + 1:
        return None  # the round's global model is not mirrored, or the next one is
    spec = task_spec(task)
    if spec is None:
        return None
    submitted = Update.objects.filter(task=task, round_number=round_number).values_list(
        "trainer", flat=True
    )
    nodes = list(SelectedNode.objects.filter(task=task).order_by("position"))
    pending = {n.device.lower() for n in nodes} - {t.lower() for t in submitted}
    told = _round_messages(
        task,
        spec=spec,
        round_number=round_number,
        nodes=nodes,
        devices=_devices_by_address(n.device for n in nodes),
        only=pending,
    )
    if told:
        log.info(
            "task %s: round %s not started by %s on their own; reminded",
            task_id,
            round_number,
            ", ".join(told),
        )
    return told


def _round_messages(
    task: Task,
    *,
    spec: dict,
    round_number: int,
    nodes: list[SelectedNode],
    devices: dict[str, Device],
    only: set[str] | None = None,
) -> list[str]:
    """Send round ``round_number``'s message to each of the task's selected ``nodes`` that is
    an enrolled device (``devices``, by lowercase address), only those whose lowercase
    address is in ``only`` when given; the addresses told."""
    aggregator = devices.get(task.aggregator.lower())
    if aggregator is None or not aggregator.dataplane_cert_sha256:
        # Without the aggregator's data plane, trainers cannot fetch the global model.
        log.warning(
            "task %s: aggregator %s has no registered data plane; round %s not started",
            task.chain_task_id,
            task.aggregator,
            round_number,
        )
        return []
    everyone = [
        devices[n.device.lower()]
        for n in nodes
        if n.role == Role.TRAINER and n.device.lower() in devices
    ]
    trainers = [d for d in everyone if only is None or d.address.lower() in only]
    deployment = contract.deployment_identity()
    common = {"task_id": task.chain_task_id, "round_number": round_number, "spec": spec}
    told = []
    for trainer in trainers:
        dispatch(
            "worker.train",
            queue=device_queue(trainer.pk),
            message=RoundTrainRequest.of(
                deployment,
                node=trainer.address,
                aggregator_url=aggregator.dataplane_url,
                aggregator_cert_sha256=aggregator.dataplane_cert_sha256,
                **common,
            ),
        )
        told.append(trainer.address)
    if round_number < task.rounds and (only is None or aggregator.address.lower() in only):
        dispatch(
            "worker.aggregate",
            queue=device_queue(aggregator.pk),
            message=RoundAggregateRequest.of(
                deployment,
                node=aggregator.address,
                trainer_urls={t.address: t.dataplane_url for t in everyone if t.dataplane_url},
                trainer_certs_sha256={
                    t.address: t.dataplane_cert_sha256 for t in everyone if t.dataplane_cert_sha256
                },
                **common,
            ),
        )
        told.append(aggregator.address)
    return told


def task_react(*, task: Task, new_events: Iterable[str]) -> None:
    """What newly mirrored events call for, judged from the task's state after them (a
    sync catching up on history fires only the latest step, not every past one)."""
    names = set(new_events)
    if "TaskCreated" in names and task.state == TaskState.BIDDING:
        task_notify_devices(task=task)
    if "NodesSelected" in names and task.state == TaskState.RUNNING and not task.published_rounds:
        task_publish_initial(task=task)
    if "GlobalModelPublished" in names:
        if task.state == TaskState.RUNNING and 1 <= task.published_rounds <= task.rounds:
            task_round_start(task=task, round_number=task.published_rounds - 1)
        elif task.state == TaskState.TRAINED:
            # The trainers check the final model within its window (worker.train of round
            # R only watches); finalize waits for the window on chain.
            task_round_start(task=task, round_number=task.rounds)
            # The buyer's own check of the final model, before the card calls it verified.
            dispatch(
                "marketplace.model_check",
                queue=PLATFORM_QUEUE,
                message=TaskStep.of(contract.deployment_identity(), task_id=task.chain_task_id),
            )
            dispatch(
                "marketplace.task_finalize",
                queue=PLATFORM_QUEUE,
                message=TaskStep.of(contract.deployment_identity(), task_id=task.chain_task_id),
            )


# ---------------------------------------------------------------- platform transactions


def _record(task_id: int, action: str, tx: TxResult, *, round_number: int = 0) -> None:
    task = Task.objects.filter(chain_task_id=task_id).first()
    if task is None:
        return
    LifecycleAction.objects.update_or_create(
        task=task,
        action=action,
        round_number=round_number,
        defaults={
            "tx_hash": tx.tx_hash,
            "detail": {"block": tx.block_number, "gas_used": tx.gas_used},
        },
    )


def task_select_nodes(*, task_id: int) -> str | None:
    """Run node selection for a task whose bidding has ended by chain time; the
    transaction's hash, or None when it is not (or no longer) due."""
    market = contract.market()
    with contract.platform_account_lock() as platform:
        info = market.task(task_id=task_id)
        if info.state != ChainTaskState.BIDDING or not _time_reached(market, info.bidding_ends):
            return None
        try:
            tx = market.select_nodes(sender=platform, task_id=task_id)
        except (InvalidTaskStateError, BiddingOpenError) as exc:
            log.info("task %s: selection not run: %s", task_id, exc.message)
            return None
        _release_unselected(market, platform, task_id=task_id)
    _record(task_id, Action.SELECT_NODES, tx)
    log.info("task %s: node selection run in %s", task_id, tx.tx_hash)
    return tx.tx_hash


def _release_unselected(market: FlexMarket, platform, *, task_id: int) -> None:
    """Credit every bidder that was not selected its stake or bond back (anyone may; the
    platform does it at once so that no deposit waits on its device)."""
    chosen = market.selection(task_id=task_id)
    keep = set() if chosen is None else {chosen.aggregator, *chosen.trainers}
    for bid in market.bids(task_id=task_id):
        if bid.device in keep:
            continue
        with contextlib.suppress(NoBidError):  # released already
            market.withdraw_bid(sender=platform, task_id=task_id, device=bid.device)


def task_finalize(*, task_id: int) -> str | None:
    """Settle a task whose final global model is published; None if it is not trained."""
    market = contract.market()
    task = market.task(task_id=task_id)
    if task.state != ChainTaskState.TRAINED:
        return None
    if task.dispute_window and chain_time(market.w3) <= task.dispute_closes_at:
        return None  # the final model may still be challenged: a later tick settles it
    with contract.platform_account_lock() as platform:
        if market.task(task_id=task_id).state != ChainTaskState.TRAINED:
            return None
        try:
            tx = market.finalize(sender=platform, task_id=task_id)
        except (InvalidTaskStateError, DisputeWindowOpenError) as exc:
            # A final model still open to challenge is settled by a later beat tick.
            log.info("task %s: not finalized: %s", task_id, exc.message)
            return None
    _record(task_id, Action.FINALIZE, tx)
    log.info("task %s: finalized in %s", task_id, tx.tx_hash)
    return tx.tx_hash


def task_abort(*, task_id: int) -> str | None:
    """Abort a running task whose aggregator missed its publish deadline (chain time);
    None when the aggregator is still in time or the task is not running."""
    market = contract.market()
    with contract.platform_account_lock() as platform:
        info = market.task(task_id=task_id)
        if info.state != ChainTaskState.RUNNING or not _time_reached(
            market, info.publish_deadline, after=True
        ):
            return None
        try:
            tx = market.abort(sender=platform, task_id=task_id)
        except (InvalidTaskStateError, DeadlineNotPassedError) as exc:
            log.info("task %s: not aborted: %s", task_id, exc.message)
            return None
    _record(task_id, Action.ABORT, tx, round_number=info.published_rounds)
    log.warning(
        "task %s: aborted in %s: the aggregator missed round %s's deadline",
        task_id,
        tx.tx_hash,
        info.published_rounds,
    )
    return tx.tx_hash


def deadlines_check() -> dict[str, list[int]]:
    """The beat's look at every live task by chain time: queue node selection once bidding
    ended, an abort once the aggregator missed its deadline, and finalization of trained
    tasks once their final model's dispute window closed (normally fired by sync already);
    send bid requests that never went out (a task whose order the website wrote after sync
    saw it). Returns the task ids per step."""
    due: dict[str, list[int]] = {"select_nodes": [], "abort": [], "finalize": [], "notify": []}
    last_published = Round.objects.filter(task=OuterRef("pk")).order_by("-number")
    notified = LifecycleAction.objects.filter(task=OuterRef("pk"), action=Action.NOTIFY_BIDS)
    live = list(
        Task.objects.filter(state__in=[TaskState.BIDDING, TaskState.RUNNING, TaskState.TRAINED])
        .annotate(
            last_published_at=Subquery(last_published.values("published_at")[:1]),
            notified=Exists(notified),
        )
        .order_by("chain_task_id")
    )
    if not live:
        return due
    market = contract.market()
    now = chain_time(market.w3)
    for task in live:
        step = None
        if task.state == TaskState.BIDDING:
            if task.bidding_ends.timestamp() <= now:
                step = "select_nodes"
            elif not task.notified and task_notify_devices(task=task) is not None:
                due["notify"].append(task.chain_task_id)
        elif task.state == TaskState.RUNNING:
            if _publish_overdue(task, now):
                info = market.task(task_id=task.chain_task_id)  # the mirror may lag: confirm
                if info.state == ChainTaskState.RUNNING and now > info.publish_deadline:
                    step = "abort"
        elif _dispute_closed(task, now):
            step = "finalize"
        if step is not None:
            due[step].append(task.chain_task_id)
            dispatch(
                f"marketplace.task_{step}",
                queue=PLATFORM_QUEUE,
                message=TaskStep.of(contract.deployment_identity(), task_id=task.chain_task_id),
            )
    return due


def _publish_overdue(task: Task, now: int) -> bool:
    """Whether running ``task``'s next global model may be overdue at chain time ``now``
    by what chain sync has mirrored, as the contract's publish deadline counts: the initial
    model a round timeout after the selection, each next one two after the last. A mirror
    that lags has an earlier last step, so this never says no to a model that is overdue;
    without the step's time (a row mirrored before it was kept) it says yes."""
    if task.last_published_at is not None:
        since, timeouts = task.last_published_at, 2
    else:
        since, timeouts = task.selected_at, 1
    return since is None or now > since.timestamp() + timeouts * task.round_timeout_s


def _dispute_closed(task: Task, now: int) -> bool:
    """Whether trained ``task``'s final model may no longer be challenged at chain time
    ``now`` (as the contract's finalize checks it), or its publication is not mirrored."""
    published = task.last_published_at
    if published is None or not task.dispute_window_s:
        return True
    return now > published.timestamp() + task.dispute_window_s
