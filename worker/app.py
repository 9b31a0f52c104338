"""A node's Celery app: the shared settings (core.queues), on the node's own broker user.

A device reaches nothing but the broker: no result store, no remote control, no events."""

from __future__ import annotations

from celery import Celery

from core.queues import celery_settings
from core.worker_steps import stop_promptly


def node_app(*, broker_url: str, queue: str) -> Celery:
    """The Celery app a node's worker process runs, with the node's tasks registered;
    ``queue`` is its own (a process serving several nodes: the first one's)."""
    app = Celery("flex-node", set_as_current=True)
    app.conf.update(
        celery_settings(broker_url=broker_url, queue=queue),
        include=["worker.tasks"],
        # Remote control would need the broadcast exchanges, which a device may not touch, and
        # would let anyone on them command every worker: a device takes work from its queue only.
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return stop_promptly(app)
