"""The door devices' reports come in by: a consumer in the platform worker on the queue
``reports``, the only one a device may publish to.

A device never sends the platform a Celery task (a task name is the sender's to choose); it
publishes a signed report (core.messages). The gateway refuses a report that does not fit its
schema, names another deployment, or is not signed by the device it names, and hands each
good one to the platform's own task for its kind (``marketplace.<kind>_report_record``), which
checks the device did that work. A refused report is logged with its error's code and
dropped (rejected without requeue), so a bad message costs one log line, never a retry.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from kombu import Consumer, Exchange, Queue

from core.errors import FlexError
from core.messages import Deployment, RoundReport, UpdateReport, report_parse
from core.queues import PLATFORM_QUEUE, REPORTS_EXCHANGE, REPORTS_QUEUE

log = logging.getLogger(__name__)

REPORTS = Queue(REPORTS_QUEUE, Exchange(REPORTS_EXCHANGE, type="direct"), routing_key=REPORTS_QUEUE)
RECORD_TASK = {
    "round": "marketplace.round_report_record",
    "update": "marketplace.update_report_record",
}


def platform_deployment() -> Deployment:
    from marketplace import contract  # needs Django's settings, ready once the worker runs

    return contract.deployment_identity()


def report_accept(body: Any, *, deployment: Deployment) -> RoundReport | UpdateReport | None:
    """The verified report in ``body``, or None for one of another deployment (logged).

    Raises MessageInvalidError or ReportSignatureError for a report that must be refused.
    """
    report = report_parse(body)
    if not report.is_for(deployment):
        return None
    return report.verify()


class ReportsGateway(bootsteps.ConsumerStep):
    """Consumes ``reports`` in the platform worker and forwards what it accepts."""

    def get_consumers(self, channel) -> list[Consumer]:
        return [
            Consumer(
                channel,
                queues=[REPORTS],
                callbacks=[self.on_message],
                accept=["json"],
                on_decode_error=self.on_decode_error,
                prefetch_count=16,
            )
        ]

    def on_decode_error(self, message, exc: Exception) -> None:
        log.warning("report refused (message_invalid): not JSON: %s", exc)
        message.reject()

    def on_message(self, body: Any, message) -> None:
        try:
            report = report_accept(body, deployment=platform_deployment())
        except FlexError as exc:
            log.warning("report refused (%s): %s", exc.code, exc.message)
            message.reject()
            return
        except Exception:  # a bug here must not stop the worker taking reports
            log.exception("report refused: unexpected error")
            message.reject()
            return
        if report is not None:
            self.app.send_task(
                RECORD_TASK[report.kind], kwargs={"message": report.dump()}, queue=PLATFORM_QUEUE
            )
        message.ack()

    def __init__(self, parent, **kwargs) -> None:
        self.app = parent.app
        super().__init__(parent, **kwargs)
