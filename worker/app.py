"""A node's Celery app: the shared queues and routing (core.queues), on the node's broker."""

from __future__ import annotations

from celery import Celery

from core.queues import celery_settings


def node_app(*, broker_url: str) -> Celery:
    """The Celery app a node's worker process runs, with the node's tasks registered."""
    app = Celery("flex-node", set_as_current=True)
    app.conf.update(celery_settings(broker_url=broker_url), include=["worker.tasks"])
    return app
