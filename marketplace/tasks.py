"""The platform's Celery tasks (queue ``platform``): thin, each calling one service.

``task_id`` is always the contract's task id. The two beat jobs never retry: the next tick
is their retry; the platform transactions retry a lost node or a busy platform account.
"""

from __future__ import annotations

import logging

from celery import shared_task

from chain.errors import ChainUnavailableError, TransactionRejectedError
from marketplace import contract, lifecycle
from marketplace.errors import ContractNotDeployedError
from marketplace.sync import chain_sync

log = logging.getLogger(__name__)

# Nothing to do until the next tick: no node, or no contract deployed yet.
NOT_NOW = (ChainUnavailableError, ContractNotDeployedError)
PLATFORM_TX = {
    "acks_late": True,
    "autoretry_for": (ChainUnavailableError, TransactionRejectedError, contract.PlatformBusyError),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "max_retries": 8,
}


@shared_task(name="marketplace.sync_chain", ignore_result=True)
def sync_chain() -> dict:
    """Beat, every FLEX_SYNC_INTERVAL_S: mirror new events (a busy lock skips the tick)."""
    try:
        return chain_sync().as_dict()
    except NOT_NOW as exc:
        log.warning("chain sync: %s; retrying next tick", exc.message)
        return {"status": exc.code}


@shared_task(name="marketplace.check_deadlines", ignore_result=True)
def check_deadlines() -> dict:
    """Beat: queue what chain time has made due (selection, abort, finalize)."""
    try:
        return lifecycle.deadlines_check()
    except NOT_NOW as exc:
        log.warning("deadline check: %s; retrying next tick", exc.message)
        return {"status": exc.code}


@shared_task(name="marketplace.task_select_nodes", **PLATFORM_TX)
def task_select_nodes(*, task_id: int) -> str | None:
    return lifecycle.task_select_nodes(task_id=task_id)


@shared_task(name="marketplace.task_finalize", **PLATFORM_TX)
def task_finalize(*, task_id: int) -> str | None:
    return lifecycle.task_finalize(task_id=task_id)


@shared_task(name="marketplace.task_abort", **PLATFORM_TX)
def task_abort(*, task_id: int) -> str | None:
    return lifecycle.task_abort(task_id=task_id)


@shared_task(name="marketplace.record_round_metrics", bind=True, acks_late=True, ignore_result=True)
def record_round_metrics(
    self,
    *,
    task_id: int,
    round_number: int,
    model_id: str,
    tx_hash: str,
    accuracy: float | None = None,
    loss: float | None = None,
    gas_used: int | None = None,
    updates: int | None = None,
    aggregate_s: float | None = None,
) -> None:
    """Sent by the aggregator, by name, right after it publishes a global model. The
    report may beat chain sync to the round: then wait for the mirror to catch up. The
    number of updates aggregated comes from the chain's mask; ``updates`` is only logged."""
    log.debug(
        "task %s round %s: %s update(s) aggregated in %ss",
        task_id,
        round_number,
        updates,
        aggregate_s,
    )
    try:
        lifecycle.round_metrics_record(
            task_id=task_id,
            round_number=round_number,
            model_id=model_id,
            tx_hash=tx_hash,
            accuracy=accuracy,
            loss=loss,
            gas_used=gas_used,
        )
    except lifecycle.RoundNotMirroredError as exc:
        raise self.retry(countdown=0.5, max_retries=240) from exc


@shared_task(
    name="marketplace.record_update_metrics", bind=True, acks_late=True, ignore_result=True
)
def record_update_metrics(
    self,
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
) -> None:
    """Sent by a trainer, by name, right after it submits an update; waits for sync like
    record_round_metrics."""
    try:
        lifecycle.update_metrics_record(
            task_id=task_id,
            round_number=round_number,
            trainer=trainer,
            model_id=model_id,
            tx_hash=tx_hash,
            num_examples=num_examples,
            loss=loss,
            accuracy=accuracy,
            train_s=train_s,
        )
    except lifecycle.UpdateNotMirroredError as exc:
        raise self.retry(countdown=0.5, max_retries=240) from exc
