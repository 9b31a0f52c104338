"""The platform's Celery tasks (queue ``platform``): thin, each named after the one service it
calls, each taking one typed message (core.messages) checked on receipt.

A message that does not fit its schema fails once with MessageInvalidError (no retry); one
for another deployment is dropped with a warning. ``task_id`` is always the contract's task
id. The two beat jobs take no message and never retry: the next tick is their retry; the
platform transactions retry a lost node or a busy platform account.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, TypeVar

from celery import shared_task

from chain.errors import ChainUnavailableError, TransactionRejectedError, UnknownTaskError
from core.errors import dropped
from core.messages import (
    Message,
    MessageInvalidError,
    ReportSignatureError,
    RoundStep,
    TaskStep,
)
from marketplace import contract, lifecycle, reports, sync
from marketplace import model_check as model_checks
from marketplace.errors import ContractNotDeployedError
from marketplace.gateway import report_accept

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

# A step for a task this chain does not have: a job left in the broker by an earlier run.
GONE = dropped(UnknownTaskError, log=log, why="a job left by an earlier run of this stack?")
# Nothing to do until the next tick: no node, or no contract deployed yet.
NOT_NOW = (ChainUnavailableError, ContractNotDeployedError)
# Refusals, logged without a traceback and never retried.
REFUSED = (MessageInvalidError, ReportSignatureError)
PLATFORM_TX = {
    "acks_late": True,
    "autoretry_for": (ChainUnavailableError, TransactionRejectedError, contract.PlatformBusyError),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "max_retries": 8,
    "throws": REFUSED,
}
# A report may beat chain sync to what it is about: it then waits for the sync, not in a retry
# loop (reports.reports_record).
REPORT = {"acks_late": True, "ignore_result": True}


def received(kind: type[M], message: Any) -> M | None:
    """The message as ``kind``, or None when it belongs to another deployment (logged)."""
    parsed = kind.parse(message)
    return parsed if parsed.is_for(contract.deployment_identity()) else None


@shared_task(name="marketplace.chain_sync", ignore_result=True)
def chain_sync() -> dict:
    """Beat, every FLEX_SYNC_INTERVAL_S: mirror new events (a busy lock skips the tick)."""
    try:
        return sync.chain_sync().as_dict()
    except NOT_NOW as exc:
        log.warning("chain sync: %s; retrying next tick", exc.message)
        return {"status": exc.code}


@shared_task(name="marketplace.deadlines_check", ignore_result=True)
def deadlines_check() -> dict:
    """Beat: queue what chain time has made due (selection, abort, finalize)."""
    try:
        return lifecycle.deadlines_check()
    except NOT_NOW as exc:
        log.warning("deadline check: %s; retrying next tick", exc.message)
        return {"status": exc.code}


def step_run(service, message: Any) -> str | None:
    """Run a lifecycle ``service`` for the task the step names; None for a step of another
    deployment. (A step for a task this chain does not have, left in the broker by a stack
    whose chain is gone, is dropped by GONE.)"""
    step = received(TaskStep, message)
    return None if step is None else service(task_id=step.task_id)


@shared_task(name="marketplace.task_select_nodes", **PLATFORM_TX)
@GONE
def task_select_nodes(message: dict) -> str | None:
    return step_run(lifecycle.task_select_nodes, message)


@shared_task(name="marketplace.task_finalize", **PLATFORM_TX)
@GONE
def task_finalize(message: dict) -> str | None:
    return step_run(lifecycle.task_finalize, message)


@shared_task(
    name="marketplace.model_check",
    acks_late=True,
    autoretry_for=(ChainUnavailableError,),
    retry_backoff=1,
    max_retries=5,
    ignore_result=True,
)
@GONE
def model_check(message: dict) -> str | None:
    """The buyer's check of a task's final model (marketplace.model_check), off the web."""
    check = step_run(model_checks.model_check, message)
    return None if check is None else check.state


@shared_task(name="marketplace.task_abort", **PLATFORM_TX)
@GONE
def task_abort(message: dict) -> str | None:
    return step_run(lifecycle.task_abort, message)


@shared_task(name="marketplace.round_remind", acks_late=True, ignore_result=True, throws=REFUSED)
def round_remind(message: dict) -> list[str] | None:
    """Sent by the lifecycle as a round opens, to run FLEX_ROUND_REMIND_S later: the round's
    messages for the nodes that did not start it on their own."""
    step = received(RoundStep, message)
    if step is None:
        return None
    return lifecycle.task_round_remind(task_id=step.task_id, round_number=step.round_number)


@shared_task(name="marketplace.reports_record", **REPORT)
def reports_record(messages: list[Any]) -> dict[str, int]:
    """Forwarded by the gateway (marketplace.gateway) a batch at a time: devices' reports on
    their own work, each stored, kept for chain sync when it comes first, or refused
    (reports.reports_record). Counts the outcomes."""
    here = contract.deployment_identity()
    batch, outcomes = [], Counter()
    for message in messages:
        try:
            report = report_accept(message, deployment=here)
        except REFUSED as exc:
            log.warning("report refused (%s): %s", exc.code, exc.message)
            outcomes[exc.code] += 1
            continue
        if report is not None:
            batch.append(report)
    outcomes.update(reports.reports_record(batch))
    return dict(outcomes)
