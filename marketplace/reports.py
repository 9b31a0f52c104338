"""What devices report about their own work, stored once the platform knows they did it.

Reports arrive verified (signature and deployment) from the gateway; here a report counts
only from the device that did the work: round metrics from the task's selected aggregator,
update metrics from the trainer that submitted the update (the report's signer).
"""

from __future__ import annotations

import logging

from core.errors import FlexError
from core.messages import RoundReport, UpdateReport
from marketplace import lifecycle
from marketplace.models import Round, Task, Update

log = logging.getLogger(__name__)


class ReportNotYoursError(FlexError):
    """A device reported on work that another device did; the report was refused."""

    code = "report_not_yours"


def round_report_record(*, report: RoundReport) -> Round | None:
    """Store the aggregator's metrics of a published global model.

    Raises ReportNotYoursError when the signer is not the task's aggregator, and
    RoundNotMirroredError while chain sync has not mirrored the selection or the round.
    """
    task = Task.objects.filter(chain_task_id=report.task_id).only("aggregator").first()
    if task is None or not task.aggregator:
        raise lifecycle.RoundNotMirroredError(task_id=report.task_id, round=report.round_number)
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
    return lifecycle.round_metrics_record(
        task_id=report.task_id,
        round_number=report.round_number,
        model_id=report.model_id,
        tx_hash=report.tx_hash,
        accuracy=report.accuracy,
        loss=report.loss,
        gas_used=report.gas_used,
    )


def update_report_record(*, report: UpdateReport) -> Update | None:
    """Store a trainer's metrics of its own update (the signer's update: no other).

    Raises UpdateNotMirroredError while chain sync has not mirrored the update.
    """
    return lifecycle.update_metrics_record(
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
