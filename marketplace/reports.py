"""What devices report about their own work, stored once the platform knows they did it.

Reports arrive verified (signature and deployment) from the gateway; here a report counts
only from the device that did the work: round metrics from the task's selected aggregator,
update metrics from the trainer that submitted the update (the report's signer).

A device reports as soon as its transaction is mined, often before chain sync has mirrored
it. Such a report is parked (report_record), by the work it names, and stored by the sync
the moment it commits that work (reports_parked_record): nothing polls for it meanwhile.
Only work the device may yet do is waited for (a round of a task it was selected for, in
the role the report is about), so a device can keep no more reports waiting than it has
rounds to work on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from django.core.cache import cache
from django.db import transaction

from core import messages
from core.errors import FlexError
from marketplace.models import Role, Round, RoundReport, SelectedNode, Task, Update, UpdateReport
from marketplace.sync.push import TaskChange, push_on_commit

log = logging.getLogger(__name__)


class UpdateNotMirroredError(FlexError):
    """Chain sync has not mirrored this update yet."""

    code = "update_not_mirrored"


class RoundNotMirroredError(FlexError):
    """Chain sync has not mirrored this round's global model yet."""

    code = "round_not_mirrored"


class ReportNotYoursError(FlexError):
    """A device reported on work that another device did; the report was refused."""

    code = "report_not_yours"


class ReportUnexpectedError(FlexError):
    """A device reported on work it cannot be doing (a task it was not selected for in that
    role, or a round the task does not have) before chain sync had it; refused, not kept."""

    code = "report_unexpected"


# How long a parked report waits for chain sync to mirror its work; one whose work never
# shows up (its transaction dropped in a re-org, say) is forgotten after it.
PARKED_S = 3600

# The work a report is about, as chain sync mirrors it: (kind, task, round, device), the
# device being the trainer of an update or the aggregator of a round.
Work = tuple[str, int, int, str]

NOT_MIRRORED = (UpdateNotMirroredError, RoundNotMirroredError)


def parked_key(work: Work) -> str:
    """Where a report on ``work`` waits for chain sync."""
    kind, task_id, round_number, device = work
    return f"report:{kind}:{task_id}:{round_number}:{device.lower()}"


def _record(report: messages.RoundReport | messages.UpdateReport) -> object:
    if isinstance(report, messages.RoundReport):
        return round_report_record(report=report)
    return update_report_record(report=report)


def report_record(*, report: messages.RoundReport | messages.UpdateReport) -> bool:
    """Store a verified ``report`` now if chain sync has mirrored its work, else park it for
    the sync to store once it has (reports_parked_record). Whether it was stored now.

    Raises ReportNotYoursError for a round report from a device other than the aggregator,
    ReportUnexpectedError for one that may not wait (_may_wait).
    """
    try:
        _record(report)
        return True
    except NOT_MIRRORED:
        pass
    _may_wait(report)
    key = parked_key((report.kind, report.task_id, report.round_number, report.device))
    cache.set(key, report.dump(), PARKED_S)
    # The sync may have committed the work between the first look and the parking, after
    # it looked for parked reports: one more look, and one of the two stores it.
    try:
        _record(report)
    except NOT_MIRRORED:
        log.info(
            "task %s round %s: %s report of %s waits for chain sync",
            report.task_id,
            report.round_number,
            report.kind,
            report.device,
        )
        return False
    cache.delete(key)
    return True


def _may_wait(report: messages.RoundReport | messages.UpdateReport) -> None:
    """Refuse to park a report on work its device cannot be doing: every key a device parks
    then names a round it may still work on, and a device with broker access cannot fill the
    platform's Redis with reports on tasks and rounds that never come. Selection is mirrored
    before a task's first round is handed out, so an honest report always passes."""
    if isinstance(report, messages.RoundReport):
        role, last = Role.AGGREGATOR, 0  # global models 0..rounds
    else:
        role, last = Role.TRAINER, 1  # updates of rounds 0..rounds - 1
    selected = SelectedNode.objects.filter(
        task__chain_task_id=report.task_id,
        task__rounds__gte=report.round_number + last,
        device__iexact=report.device,
        role=role,
    )
    if not selected.exists():
        raise ReportUnexpectedError(
            task_id=report.task_id,
            round=report.round_number,
            device=report.device,
            kind=report.kind,
        )


def reports_parked_record(work: Iterable[Work]) -> int:
    """Store the parked reports on ``work`` that chain sync has just committed; how many."""
    keys = [parked_key(w) for w in work]
    parked = cache.get_many(keys) if keys else {}
    done, stored = [], 0
    for key, body in parked.items():
        try:
            stored += _record(messages.report_parse(body)) is not None  # verified when parked
        except NOT_MIRRORED:
            continue
        except FlexError as exc:
            log.warning("parked report %s refused: %s (%s)", key, exc.message, exc.code)
        done.append(key)
    if done:
        cache.delete_many(done)
    return stored


def round_report_record(*, report: messages.RoundReport) -> RoundReport | None:
    """Store the aggregator's metrics of a published global model.

    Raises ReportNotYoursError when the signer is not the task's aggregator, and
    RoundNotMirroredError while chain sync has not mirrored the selection or the round.
    """
    task = Task.objects.filter(chain_task_id=report.task_id).only("aggregator").first()
    if task is None or not task.aggregator:
        raise RoundNotMirroredError(task_id=report.task_id, round=report.round_number)
    if task.aggregator.lower() != report.device.lower():
        raise ReportNotYoursError(
            task_id=report.task_id, device=report.device, aggregator=task.aggregator
        )
    log.debug(
        "task %s round %s: %s update(s) aggregated in %ss",
        report.task_id,
        report.round_number,
        report.updates,
        report.aggregate_s,
    )
    return round_metrics_record(
        task_id=report.task_id,
        round_number=report.round_number,
        model_id=report.model_id,
        tx_hash=report.tx_hash,
        accuracy=report.accuracy,
        loss=report.loss,
        gas_used=report.gas_used,
    )


def update_report_record(*, report: messages.UpdateReport) -> UpdateReport | None:
    """Store a trainer's metrics of its own update (the signer's update: no other).

    Raises UpdateNotMirroredError while chain sync has not mirrored the update.
    """
    return update_metrics_record(
        task_id=report.task_id,
        round_number=report.round_number,
        trainer=report.device,
        model_id=report.model_id,
        tx_hash=report.tx_hash,
        num_examples=report.num_examples,
        loss=report.loss,
        accuracy=report.accuracy,
        train_s=report.train_s,
    )


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
) -> UpdateReport | None:
    """Record what a trainer measured on its own data for its update of ``round_number``.

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
    report, _ = UpdateReport.objects.update_or_create(
        update=row,
        defaults={
            "model_id": row.model_id,
            "num_examples": None if num_examples is None else int(num_examples),
            "loss": _finite(loss),
            "accuracy": _finite(accuracy),
            "train_s": _finite(train_s),
        },
    )
    return report


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
) -> RoundReport | None:
    """Record what the aggregator measured for global model ``round_number``.

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
    report, _ = RoundReport.objects.update_or_create(
        round=row,
        defaults={
            "model_id": row.global_model_id,
            "tx_hash": row.tx_hash,
            "accuracy": _finite(accuracy),
            "loss": _finite(loss),
            "gas_used": None if gas_used is None else int(gas_used),
        },
    )
    push_on_commit(changes={task_id: TaskChange(rounds={round_number})})
    return report
