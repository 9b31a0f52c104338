"""The task lifecycle the platform drives from the mirror: who is asked to do what, and when.

Two kinds of steps. Device messages (bid, publish the initial model, train and aggregate a
round) follow newly mirrored events: chain sync calls ``task_react`` inside the transaction
that mirrors them; the step is recorded as a LifecycleAction (once per task, action and
round) and its Celery messages leave when that transaction commits. Platform transactions
(select nodes, finalize, abort) follow chain time: the beat's ``deadlines_check`` queues them
and each checks the chain again, under the platform account's lock, before it sends.

Every step is safe to fire twice: the LifecycleAction row or the chain state stops a second
one here, and the worker tasks check the chain before acting on a redelivered message.
Celery tasks are addressed by name and queue only (the worker never imports marketplace);
``task_id`` in every message is the contract's task id.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterable
from typing import Any

from celery import Celery, current_app
from django.db import transaction
from django.db.models import QuerySet

from chain.client import FlexMarket
from chain.errors import BiddingOpenError, DeadlineNotPassedError, InvalidTaskStateError
from chain.events import TaskState as ChainTaskState
from chain.node import chain_time
from chain.records import TxResult
from core.errors import FlexError
from core.queues import PLATFORM_QUEUE, device_queue
from marketplace import contract
from marketplace.consumers import task_updates_push
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


class UpdateNotMirroredError(FlexError):
    """Chain sync has not mirrored this update yet."""

    code = "update_not_mirrored"


class RoundNotMirroredError(FlexError):
    """Chain sync has not mirrored this round's global model yet."""

    code = "round_not_mirrored"


# ---------------------------------------------------------------- plumbing


def dispatch(name: str, *, queue: str, kwargs: dict[str, Any]) -> None:
    """Send the Celery task ``name`` to ``queue`` once the current transaction commits
    (at once outside one). A broker failure then is logged: the commit stands."""
    transaction.on_commit(
        functools.partial((celery_app or current_app).send_task, name, kwargs=kwargs, queue=queue),
        robust=True,
    )


def task_spec(task: Task) -> dict | None:
    """The task's spec as the worker tasks take it, or None when the platform does not know
    it (a task created on chain outside the website)."""
    spec = task.spec
    if isinstance(spec, str):
        spec = json.loads(spec) if spec else None
    return spec or None


def devices_eligible() -> QuerySet[Device]:
    """Enrolled devices that may be asked to bid: not revoked here nor on chain."""
    return Device.objects.filter(revoked_at__isnull=True).exclude(chain_status="revoked")


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
    """Ask every eligible device to bid (worker.place_bid on its own queue); each decides
    from its own policy. Only for tasks whose spec the platform knows."""
    spec = task_spec(task)
    if spec is None or task.chain_task_id is None or _fired(task, Action.NOTIFY_BIDS):
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
    for device in devices:
        dispatch(
            "worker.place_bid",
            queue=device_queue(device.pk),
            kwargs={"node_address": device.address, "task_id": task.chain_task_id, "spec": spec},
        )
    log.info("task %s: %d device(s) asked to bid", task.chain_task_id, len(devices))
    return action


@transaction.atomic
def task_publish_initial(*, task: Task) -> LifecycleAction | None:
    """Ask the selected aggregator to publish the round-0 model (worker.publish_initial_model)."""
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
        "worker.publish_initial_model",
        queue=device_queue(aggregator.pk),
        kwargs={"node_address": aggregator.address, "task_id": task.chain_task_id, "spec": spec},
    )
    log.info("task %s: aggregator %s asked for the initial model", task.chain_task_id, aggregator)
    return action


@transaction.atomic
def task_round_start(*, task: Task, round_number: int) -> LifecycleAction | None:
    """Open round ``round_number``: worker.train_round to each selected trainer (fetching the
    global model from the aggregator's data plane) and worker.aggregate_round to the
    aggregator (fetching the updates from the trainers'), which waits for the updates."""
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
    aggregator = devices.get(task.aggregator.lower())
    if aggregator is None:
        # Without the aggregator's data plane, trainers cannot fetch the global model.
        return action
    trainers = [devices.get(n.device.lower()) for n in nodes if n.role == Role.TRAINER]
    trainers = [d for d in trainers if d is not None]
    common = {"task_id": task.chain_task_id, "round_number": round_number, "spec": spec}
    for trainer in trainers:
        dispatch(
            "worker.train_round",
            queue=device_queue(trainer.pk),
            kwargs={
                "node_address": trainer.address,
                "aggregator_url": aggregator.dataplane_url,
                "aggregator_cert_sha256": aggregator.dataplane_cert_sha256,
                **common,
            },
        )
    dispatch(
        "worker.aggregate_round",
        queue=device_queue(aggregator.pk),
        kwargs={
            "node_address": aggregator.address,
            "trainer_urls": {t.address: t.dataplane_url for t in trainers if t.dataplane_url},
            "trainer_certs_sha256": {t.address: t.dataplane_cert_sha256 for t in trainers},
            **common,
        },
    )
    log.info(
        "task %s: round %s opened for %d trainer(s)",
        task.chain_task_id,
        round_number,
        len(trainers),
    )
    return action


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
            dispatch(
                "marketplace.task_finalize",
                queue=PLATFORM_QUEUE,
                kwargs={"task_id": task.chain_task_id},
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
    _record(task_id, Action.SELECT_NODES, tx)
    log.info("task %s: node selection run in %s", task_id, tx.tx_hash)
    return tx.tx_hash


def task_finalize(*, task_id: int) -> str | None:
    """Settle a task whose final global model is published; None if it is not trained."""
    market = contract.market()
    with contract.platform_account_lock() as platform:
        if market.task(task_id=task_id).state != ChainTaskState.TRAINED:
            return None
        try:
            tx = market.finalize(sender=platform, task_id=task_id)
        except InvalidTaskStateError as exc:
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
    tasks (normally fired by sync already); send bid requests that never went out (a task
    whose spec the website added after sync saw it). Returns the task ids per step."""
    due: dict[str, list[int]] = {"select_nodes": [], "abort": [], "finalize": [], "notify": []}
    live = list(
        Task.objects.filter(
            chain_task_id__isnull=False,
            state__in=[TaskState.BIDDING, TaskState.RUNNING, TaskState.TRAINED],
        ).order_by("chain_task_id")
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
            elif task_notify_devices(task=task) is not None:
                due["notify"].append(task.chain_task_id)
        elif task.state == TaskState.RUNNING:
            info = market.task(task_id=task.chain_task_id)
            if info.state == ChainTaskState.RUNNING and now > info.publish_deadline:
                step = "abort"
        else:
            step = "finalize"
        if step is not None:
            due[step].append(task.chain_task_id)
            dispatch(
                f"marketplace.task_{step}",
                queue=PLATFORM_QUEUE,
                kwargs={"task_id": task.chain_task_id},
            )
    return due


# ---------------------------------------------------------------- round metrics


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@transaction.atomic
def update_metrics_record(
    *,
    task_id: int,
    round_number: int,
    trainer: str,
    model_id: str,
    tx_hash: str,
    num_examples: int | None = None,
    loss: float | None = None,
    accuracy: float | None = None,
    train_s: float | None = None,
) -> Update | None:
    """Store what a trainer measured on its own data for its update of ``round_number``.

    As with round metrics, the report must name the update ID and transaction the chain has;
    a mismatch is logged and dropped. Raises UpdateNotMirroredError until sync has it."""
    row = (
        Update.objects.select_for_update()
        .filter(task__chain_task_id=task_id, round_number=round_number, trainer__iexact=trainer)
        .first()
    )
    if row is None:
        raise UpdateNotMirroredError(task_id=task_id, round=round_number, trainer=trainer)
    if (row.model_id.lower(), row.tx_hash.lower()) != (model_id.lower(), tx_hash.lower()):
        log.warning(
            "task %s round %s: metrics of %s for update %s do not match the chain; dropped",
            task_id,
            round_number,
            trainer,
            model_id,
        )
        return None
    row.num_examples = None if num_examples is None else int(num_examples)
    row.local_loss, row.local_accuracy = _finite(loss), _finite(accuracy)
    row.train_s = _finite(train_s)
    row.save(update_fields=["num_examples", "local_loss", "local_accuracy", "train_s"])
    return row


@transaction.atomic
def round_metrics_record(
    *,
    task_id: int,
    round_number: int,
    model_id: str,
    tx_hash: str,
    accuracy: float | None = None,
    loss: float | None = None,
    gas_used: int | None = None,
) -> Round | None:
    """Store what the aggregator measured for global model ``round_number`` on its Round.

    The report must name the model ID and transaction the chain has for that round (any
    broker client could send one); a mismatch is logged and dropped. Raises
    RoundNotMirroredError while sync has not mirrored the round yet.
    """
    row = (
        Round.objects.select_for_update()
        .filter(task__chain_task_id=task_id, number=round_number)
        .first()
    )
    if row is None:
        raise RoundNotMirroredError(task_id=task_id, round=round_number)
    if (row.global_model_id.lower(), row.tx_hash.lower()) != (model_id.lower(), tx_hash.lower()):
        log.warning(
            "task %s round %s: metrics for model %s in %s do not match the chain (%s in %s); "
            "dropped",
            task_id,
            round_number,
            model_id,
            tx_hash,
            row.global_model_id,
            row.tx_hash,
        )
        return None
    row.accuracy, row.loss = _finite(accuracy), _finite(loss)
    row.gas_used = None if gas_used is None else int(gas_used)
    row.save(update_fields=["accuracy", "loss", "gas_used"])
    transaction.on_commit(functools.partial(task_updates_push, task_ids=[row.task_id]), robust=True)
    return row
