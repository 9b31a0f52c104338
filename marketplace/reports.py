"""What devices report about their own work, stored once the platform knows they did it.

Reports arrive verified (signature and deployment) from the gateway; here a report counts
only from the device that did the work: round metrics from the task's selected aggregator,
update metrics from the trainer that submitted the update (the report's signer).

A device reports as soon as its transaction is mined, often before chain sync has mirrored
it. Such a report is parked (reports_record), by the work it names, and stored by the sync
the moment it commits that work (reports_parked_record): nothing polls for it meanwhile.
Only work the device may yet do is waited for (a round of a task it was selected for, in
the role the report is about), so a device can keep no more reports waiting than it has
rounds to work on.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from django.core.cache import cache
from django.db import transaction
from django.db.models import F, Q

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


Report = messages.RoundReport | messages.UpdateReport

# The role a report's device must have been selected in, and how many rounds short of the
# task's last that work ends: global models 0..rounds, updates of rounds 0..rounds - 1.
ROLE_LAST = {"round": (Role.AGGREGATOR, 0), "update": (Role.TRAINER, 1)}


def _work(report: Report) -> Work:
    return (report.kind, report.task_id, report.round_number, report.device.lower())


def _record_all(batch: Sequence[Report]) -> list[object]:
    """Each report of ``batch`` stored: its row, None when it was dropped (it names other
    work than the chain has; logged), or the FlexError it was refused with. The updates'
    metrics are stored together (update_metrics_record_all), in a few queries however many."""
    updates = [_metrics(r) for r in batch if isinstance(r, messages.UpdateReport)]
    stored = iter(update_metrics_record_all(updates))  # in the batch's order
    outcomes: list[object] = []
    for report in batch:
        if isinstance(report, messages.UpdateReport):
            outcomes.append(next(stored))
            continue
        try:
            outcomes.append(round_report_record(report=report))
        except FlexError as exc:
            outcomes.append(exc)
    return outcomes


def _refused(report: Report, exc: FlexError) -> str:
    log.warning(
        "task %s round %s: %s report of %s refused (%s): %s",
        report.task_id,
        report.round_number,
        report.kind,
        report.device,
        exc.code,
        exc.message,
    )
    return exc.code


def reports_record(batch: Sequence[Report]) -> Counter[str]:
    """Store each verified report of ``batch`` whose work chain sync has mirrored, park the
    others that may wait for the sync to store them (reports_parked_record), and refuse the
    rest, each on its own: one refusal costs the other reports nothing.

    Counts the outcomes: ``stored``, ``waiting``, ``dropped`` (it names another model or
    transaction than the chain has; logged) or the code of the error it was refused with.
    A batch costs a few queries whatever its size: reports nearly always beat chain sync to
    their work, so most are parked.
    """
    mirrored = _mirrored(batch)
    outcomes = _each_record([r for r in batch if _work(r) in mirrored])
    waiting, refused = _may_wait([r for r in batch if _work(r) not in mirrored])
    outcomes.update(refused)
    if not waiting:
        return outcomes
    cache.set_many({parked_key(_work(r)): r.dump() for r in waiting}, PARKED_S)
    # The sync may have committed the work between the first look and the parking, after
    # it looked for parked reports: one more look, and one of the two stores each.
    mirrored = _mirrored(waiting)
    now = [r for r in waiting if _work(r) in mirrored]
    outcomes.update(_each_record(now))
    cache.delete_many([parked_key(_work(r)) for r in now])
    for report in waiting:
        if _work(report) not in mirrored:
            outcomes["waiting"] += 1
            log.info(
                "task %s round %s: %s report of %s waits for chain sync",
                report.task_id,
                report.round_number,
                report.kind,
                report.device,
            )
    return outcomes


def _each_record(batch: Sequence[Report]) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    for report, outcome in zip(batch, _record_all(batch), strict=True):
        if isinstance(outcome, FlexError):
            outcomes[_refused(report, outcome)] += 1
        else:
            outcomes["stored" if outcome is not None else "dropped"] += 1
    return outcomes


def _mirrored(batch: Sequence[Report]) -> set[Work]:
    """The work chain sync has mirrored among that of ``batch``'s reports."""
    work: set[Work] = set()
    for kind, model, number, device in (
        ("update", Update, "round_number", "trainer"),
        ("round", Round, "number", "task__aggregator"),
    ):
        of_kind = [r for r in batch if r.kind == kind]
        if not of_kind:
            continue
        rows = model.objects.filter(
            task__chain_task_id__in={r.task_id for r in of_kind},
            **{f"{number}__in": {r.round_number for r in of_kind}},
        ).values_list("task__chain_task_id", number, device)
        work.update((kind, task_id, n, who.lower()) for task_id, n, who in rows)
    return work


def _may_wait(batch: Sequence[Report]) -> tuple[list[Report], Counter[str]]:
    """The reports of ``batch`` that may wait for chain sync, and the refusals of the rest.

    Only a report on work its device may still be doing waits (a round of a task that
    selected it, in the role the report is about): every key a device parks then names a
    round it may yet work on, and a device with broker access cannot fill the platform's
    Redis with reports on tasks and rounds that never come. Selection is mirrored before a
    task's first round is handed out, so an honest report always waits.
    """
    refused: Counter[str] = Counter()
    if not batch:
        return [], refused
    rows = SelectedNode.objects.filter(
        task__chain_task_id__in={r.task_id for r in batch}
    ).values_list("task__chain_task_id", "task__rounds", "device", "role")
    rounds_of = {(task_id, device.lower(), role): rounds for task_id, rounds, device, role in rows}
    aggregator_of = {t: d.lower() for t, _, d, role in rows if role == Role.AGGREGATOR}
    waiting = []
    for report in batch:
        role, last = ROLE_LAST[report.kind]
        rounds = rounds_of.get((report.task_id, report.device.lower(), role))
        if rounds is not None and report.round_number + last <= rounds:
            waiting.append(report)
            continue
        aggregator = aggregator_of.get(report.task_id)
        if report.kind == "round" and aggregator not in (None, report.device.lower()):
            exc: FlexError = ReportNotYoursError(
                task_id=report.task_id, device=report.device, aggregator=aggregator
            )
        else:
            exc = ReportUnexpectedError(
                task_id=report.task_id,
                round=report.round_number,
                device=report.device,
                kind=report.kind,
            )
        refused[_refused(report, exc)] += 1
    return waiting, refused


def reports_parked_record(work: Iterable[Work]) -> int:
    """Store the parked reports on ``work`` that chain sync has just committed; how many."""
    keys = [parked_key(w) for w in work]
    parked = cache.get_many(keys) if keys else {}
    done, read, stored = [], {}, 0
    for key, body in parked.items():
        try:
            read[key] = messages.report_parse(body)  # verified when parked
        except FlexError as exc:
            log.warning("parked report %s refused: %s (%s)", key, exc.message, exc.code)
            done.append(key)
    for key, outcome in zip(read, _record_all(list(read.values())), strict=True):
        if isinstance(outcome, NOT_MIRRORED):
            continue
        if isinstance(outcome, FlexError):
            log.warning("parked report %s refused: %s (%s)", key, outcome.message, outcome.code)
        else:
            stored += outcome is not None
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


@dataclass(frozen=True)
class UpdateMetrics:
    """What a trainer measured on its own data for its update of a round, as it reports it."""

    task_id: int
    round_number: int
    trainer: str
    model_id: str
    tx_hash: str
    num_examples: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    train_s: float | None = None


def _metrics(report: messages.UpdateReport) -> UpdateMetrics:
    """The metrics of a trainer's report on its own update (the signer's: no other)."""
    return UpdateMetrics(
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


def update_metrics_record(**fields: object) -> UpdateReport | None:
    """Record what a trainer measured on its own data for its update (UpdateMetrics'
    fields): update_metrics_record_all for one. Raises UpdateNotMirroredError until sync has
    the update."""
    [found] = update_metrics_record_all([UpdateMetrics(**fields)])  # type: ignore[arg-type]
    if isinstance(found, UpdateNotMirroredError):
        raise found
    return found


@transaction.atomic
def update_metrics_record_all(
    metrics: Sequence[UpdateMetrics],
) -> list[UpdateReport | UpdateNotMirroredError | None]:
    """Record what trainers measured for their updates: for each of ``metrics``, its stored
    report; None when it names another update ID or transaction than the chain has (logged
    and dropped, as for round metrics); UpdateNotMirroredError while sync has not mirrored
    the update. Two queries however many (a round's reports come together): the updates,
    locked, then the reports written or rewritten at once; of two on one update, the last."""
    if not metrics:
        return []
    wanted = functools.reduce(
        operator.or_,
        (
            Q(task__chain_task_id=m.task_id, round_number=m.round_number, trainer__iexact=m.trainer)
            for m in metrics
        ),
    )
    rows = {
        (row.chain_task_id, row.round_number, row.trainer.lower()): row
        for row in Update.objects.select_for_update(of=("self",))
        .filter(wanted)
        .annotate(chain_task_id=F("task__chain_task_id"))
    }
    found: list[UpdateReport | UpdateNotMirroredError | None] = []
    reports: dict[int, UpdateReport] = {}
    for m in metrics:
        row = rows.get((m.task_id, m.round_number, m.trainer.lower()))
        if row is None:
            found.append(
                UpdateNotMirroredError(task_id=m.task_id, round=m.round_number, trainer=m.trainer)
            )
            continue
        if (row.model_id.lower(), row.tx_hash.lower()) != (m.model_id.lower(), m.tx_hash.lower()):
            log.warning(
                "task %s round %s: metrics of %s for update %s do not match the chain; dropped",
                m.task_id,
                m.round_number,
                m.trainer,
                m.model_id,
            )
            found.append(None)
            continue
        reports[row.pk] = UpdateReport(
            update=row,
            model_id=row.model_id,
            num_examples=None if m.num_examples is None else int(m.num_examples),
            loss=_finite(m.loss),
            accuracy=_finite(m.accuracy),
            train_s=_finite(m.train_s),
        )
        found.append(reports[row.pk])
    UpdateReport.objects.bulk_create(
        reports.values(),
        update_conflicts=True,
        unique_fields=["update"],
        update_fields=["model_id", "num_examples", "loss", "accuracy", "train_s"],
    )
    return found


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
