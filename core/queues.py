"""Where Celery work goes: the queue names and the broker settings the platform and every
node share (each process builds its own Celery app from them)."""

from __future__ import annotations

from typing import Any

PLATFORM_QUEUE = "platform"
AGGREGATE_QUEUE = "aggregate"
TRAIN_QUEUES = {"cpu": "train.cpu", "gpu": "train.gpu", "jetson": "train.jetson"}


def device_queue(device_id: int) -> str:
    """The queue for work addressed to one enrolled device."""
    return f"device.{device_id}"


def celery_settings(*, broker_url: str, result_backend: str | None = None) -> dict[str, Any]:
    """The Celery configuration every FLEX process starts from: queues, routing, acks, JSON."""
    from kombu import Exchange, Queue

    def queue(name: str) -> Queue:
        # A direct exchange per queue, so a message reaches exactly the queue it names.
        return Queue(name, Exchange(name, type="direct"), routing_key=name)

    return {
        "broker_url": broker_url,
        "result_backend": result_backend or broker_url,
        "task_default_queue": PLATFORM_QUEUE,
        "task_queues": [
            queue(q) for q in (PLATFORM_QUEUE, AGGREGATE_QUEUE, *TRAIN_QUEUES.values())
        ],
        # Device queues are created on demand (one per enrolled device): workers declare them.
        "task_create_missing_queues": True,
        "task_routes": {"marketplace.*": {"queue": PLATFORM_QUEUE}},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_expires": 3600,
        "broker_connection_retry_on_startup": True,
        # A task that outlives the visibility timeout is redelivered: keep it above the limits.
        "broker_transport_options": {"visibility_timeout": 3600},
        "timezone": "UTC",
    }
