"""The platform's Celery app: the shared settings (core.queues), Celery beat, and the gateway
that takes devices' reports.

The platform's worker and beat run with DJANGO_SETTINGS_MODULE set, which makes Celery's
Django fix-up set Django up; beat runs the chain sync and the lifecycle's deadline check
(``beat_schedule``). The broker is FLEX_BROKER_URL (RabbitMQ, this stack's vhost); results
go to the platform's own Redis. Nodes build their own app (worker.app) from the same settings.
"""

from __future__ import annotations

import logging
import os

from celery import Celery

from core.queues import DEFAULT_BROKER_URL, PLATFORM_QUEUE, celery_settings

# Read from the same variable as settings.FLEX_SYNC_INTERVAL_S: this module needs no Django.
SYNC_INTERVAL_S = float(os.environ.get("FLEX_SYNC_INTERVAL_S", 1.0))


# Beat's heartbeats run every second: Celery's own lines for each (sent, received, succeeded)
# would be most of the log. What they do is logged by them, and only when something changed.
HEARTBEATS = ("marketplace.chain_sync", "marketplace.deadlines_check")


class QuietHeartbeats(logging.Filter):
    """Drops Celery's routine INFO lines about the beat's heartbeat tasks; keeps the rest,
    and anything about them at WARNING or above."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        message = record.getMessage()
        return not any(name in message for name in HEARTBEATS)


for _logger in ("celery.beat", "celery.worker.strategy", "celery.app.trace"):
    logging.getLogger(_logger).addFilter(QuietHeartbeats())


def platform_app(*, broker_url: str, result_backend: str | None, **options) -> Celery:
    """The platform's Celery app on ``broker_url``: its tasks, beat schedule and gateway."""
    app = Celery("flex", **options)
    app.conf.update(celery_settings(broker_url=broker_url, result_backend=result_backend))
    # Celery beat: the platform's heartbeats. A tick not taken in time is dropped (expires),
    # not run late in a burst: the next one does the same work.
    app.conf.beat_schedule = {
        "chain-sync": {
            "task": "marketplace.chain_sync",
            "schedule": SYNC_INTERVAL_S,
            "options": {"queue": PLATFORM_QUEUE, "expires": max(SYNC_INTERVAL_S * 5, 5.0)},
        },
        "lifecycle-deadlines": {
            "task": "marketplace.deadlines_check",
            "schedule": SYNC_INTERVAL_S,
            "options": {"queue": PLATFORM_QUEUE, "expires": max(SYNC_INTERVAL_S * 5, 5.0)},
        },
    }
    if os.environ.get("DJANGO_SETTINGS_MODULE"):
        from marketplace.gateway import ReportsGateway

        app.autodiscover_tasks(["marketplace"])
        # Devices' reports reach the platform only through the gateway, never as Celery tasks.
        app.steps["consumer"].add(ReportsGateway)
    return app


app = platform_app(
    broker_url=os.environ.get("FLEX_BROKER_URL", DEFAULT_BROKER_URL),
    result_backend=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
)
