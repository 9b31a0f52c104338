"""FLEX's Celery app: broker, queues and routes, shared by the platform and every node.

Plain Celery: importing it needs no Django and no database, so a device worker uses the same
app and routing as the platform. The platform's worker and beat run with
DJANGO_SETTINGS_MODULE set, which makes Celery's Django fix-up set Django up; beat runs the
chain sync and the lifecycle's deadline check (``beat_schedule``).
"""

from __future__ import annotations

import os

from celery import Celery
from kombu import Exchange, Queue

PLATFORM_QUEUE = "platform"
AGGREGATE_QUEUE = "aggregate"
TRAIN_QUEUES = {"cpu": "train.cpu", "gpu": "train.gpu", "jetson": "train.jetson"}


def device_queue(device_id: int) -> str:
    """The queue for work addressed to one enrolled device."""
    return f"device.{device_id}"


def _queue(name: str) -> Queue:
    # A direct exchange per queue, so a message reaches exactly the queue it names.
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


app = Celery("flex")
app.conf.update(
    broker_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    result_backend=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    task_default_queue=PLATFORM_QUEUE,
    task_queues=[_queue(q) for q in (PLATFORM_QUEUE, AGGREGATE_QUEUE, *TRAIN_QUEUES.values())],
    # Device queues are created on demand (one per enrolled device), so let workers declare them.
    task_create_missing_queues=True,
    task_routes={"marketplace.*": {"queue": PLATFORM_QUEUE}},
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    # A task that outlives the visibility timeout is redelivered: keep it above the time limits.
    broker_transport_options={"visibility_timeout": 3600},
    timezone="UTC",
)

# Read from the same variable as settings.FLEX_SYNC_INTERVAL_S: this module needs no Django.
SYNC_INTERVAL_S = float(os.environ.get("FLEX_SYNC_INTERVAL_S", 1.0))
# Celery beat: the platform's heartbeats. A tick not taken in time is dropped (expires), not
# run late in a burst: the next one does the same work.
app.conf.beat_schedule = {
    "chain-sync": {
        "task": "marketplace.sync_chain",
        "schedule": SYNC_INTERVAL_S,
        "options": {"queue": PLATFORM_QUEUE, "expires": max(SYNC_INTERVAL_S * 5, 5.0)},
    },
    "lifecycle-deadlines": {
        "task": "marketplace.check_deadlines",
        "schedule": SYNC_INTERVAL_S,
        "options": {"queue": PLATFORM_QUEUE, "expires": max(SYNC_INTERVAL_S * 5, 5.0)},
    },
}
if os.environ.get("DJANGO_SETTINGS_MODULE"):
    app.autodiscover_tasks(["marketplace"])
