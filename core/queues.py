"""Where messages go: the queue names, what a device's broker user may touch, and the Celery
settings the platform and every node start from (each process builds its own Celery app).

The platform's processes share the queue ``platform``; each enrolled device consumes only its
own queue ``device.<id>`` and publishes only signed reports to the exchange ``reports``, whose
queue only the platform reads. The broker enforces that per device user (``device_permissions``).
"""

from __future__ import annotations

import re
from typing import Any

# The broker when none is configured: a RabbitMQ on this machine, its default vhost.
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
PLATFORM_QUEUE = "platform"
# Devices publish their reports here; only the platform worker consumes the queue behind it.
REPORTS_EXCHANGE = REPORTS_QUEUE = "reports"


def device_queue(device_id: int) -> str:
    """The queue for work addressed to one enrolled device (its exchange has the same name)."""
    return f"device.{device_id}"


def route(queue: str) -> dict[str, str]:
    """Where to send a message for ``queue``: its own direct exchange, named like it. Celery
    would use the default exchange, which reaches every queue and so is closed to devices; a
    retry goes back the way its message came, so it must come this way."""
    return {"queue": queue, "exchange": queue, "routing_key": queue}


def device_permissions(device_id: int) -> dict[str, str]:
    """A device's broker permissions in its vhost (regular expressions over queue and exchange
    names, RabbitMQ's model): declare, read and re-queue its own queue, publish its reports."""
    own = re.escape(device_queue(device_id))
    return {
        "configure": f"^{own}$",
        "write": f"^({own}|{re.escape(REPORTS_EXCHANGE)})$",
        "read": f"^{own}$",
    }


def celery_settings(
    *, broker_url: str, result_backend: str | None = None, queue: str = PLATFORM_QUEUE
) -> dict[str, Any]:
    """The Celery configuration every FLEX process starts from: its own queue as the default
    (a device's retries go back to its queue, the only one it may declare), acks, JSON only.

    ``result_backend`` None keeps no results (devices: they reach nothing but the broker).
    """
    from kombu import Exchange, Queue

    return {
        "broker_url": broker_url,
        "result_backend": result_backend,
        "task_ignore_result": result_backend is None,
        # A direct exchange per queue, so a message reaches exactly the queue it names;
        # device queues are created on demand (one per enrolled device), the same way.
        "task_queues": [Queue(queue, Exchange(queue), routing_key=queue)],
        "task_default_queue": queue,
        "task_default_exchange": queue,
        "task_default_routing_key": queue,
        "task_create_missing_queues": True,
        "task_routes": {"marketplace.*": route(PLATFORM_QUEUE)},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_expires": 3600,
        "broker_connection_retry_on_startup": True,
        # A lost connection (a broker restart, a revoked device) hands unfinished work back.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "timezone": "UTC",
    }
