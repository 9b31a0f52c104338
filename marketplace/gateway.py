"""The door devices' reports come in by: a consumer in the platform worker on the queue
``reports``, the only one a device may publish to.

A device never sends the platform a Celery task (a task name is the sender's to choose); it
publishes a signed report (core.messages). The gateway refuses a report that does not fit its
schema, names another deployment, or is not signed by the device it names, and hands the good
ones on in batches to the platform's own task (``marketplace.reports_record``), which checks
each device did the work it reports on. A refused report is logged with its error's code and
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
# A batch is handed on when it holds this many reports (the consumer's prefetch: no more
# are delivered unacked) or this long after its first came.
BATCH_MAX = 16
BATCH_WAIT_S = 0.2


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
    """Consumes ``reports`` in the platform worker and forwards what it accepts in batches.

    The consumer's callbacks and its timer run in the worker's event loop, one at a time, so
    the batch needs no lock. A batch is acked once its task is sent, never before: a worker
    that stops or loses its connection meanwhile closes the channel, and the broker hands
    the unacked reports out again.
    """

    def __init__(self, parent, **kwargs) -> None:
        self.app = parent.app
        self.batch: list[tuple[dict, Any]] = []
        self.flush_timer = None
        self.timer = None
        super().__init__(parent, **kwargs)

    def start(self, c) -> None:
        self.timer = c.timer
        super().start(c)

    # A batch not yet handed on is left unacked: the channel closes, the broker redelivers.
    def stop(self, c) -> None:
        self._forget()
        super().stop(c)

    def shutdown(self, c) -> None:
        self._forget()
        super().shutdown(c)

    def get_consumers(self, channel) -> list[Consumer]:
        return [
            Consumer(
                channel,
                queues=[REPORTS],
                callbacks=[self.on_message],
                accept=["json"],
                on_decode_error=self.on_decode_error,
                prefetch_count=BATCH_MAX,
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
        if report is None:
            message.ack()
            return
        self.batch.append((report.dump(), message))
        if len(self.batch) >= BATCH_MAX:
            self.flush()
        elif self.flush_timer is None:
            self.flush_timer = self.timer.call_after(BATCH_WAIT_S, self.flush)

    def flush(self) -> None:
        """Hand the batch on as one task, then ack its reports."""
        batch = self.batch
        self._forget()
        if not batch:
            return
        try:
            self.app.send_task(
                "marketplace.reports_record",
                kwargs={"messages": [body for body, _ in batch]},
                queue=PLATFORM_QUEUE,
            )
        except Exception:  # the broker refused it: the reports go back to the queue
            log.exception("%s report(s) not handed on; back to the queue", len(batch))
            for _, message in batch:
                message.requeue()
            return
        for _, message in batch:
            message.ack()

    def _forget(self) -> None:
        if self.flush_timer is not None:
            self.flush_timer.cancel()
        self.flush_timer, self.batch = None, []
