"""The platform's Celery app: the shared settings (core.queues), Celery beat, and the gateway
that takes devices' reports.

The platform's worker and beat run with DJANGO_SETTINGS_MODULE set, which makes Celery's
Django fix-up set Django up; beat runs the chain sync and the lifecycle's deadline check
(``beat_schedule``). Beat also sends the chain sync the moment the node announces a new block
(a websocket subscription, ``follow_the_chain``), so its own chain-sync tick is only the slow
safety net, every FLEX_SYNC_INTERVAL_S. The broker is FLEX_BROKER_URL (RabbitMQ, this stack's
vhost); results go to the platform's own Redis. Nodes build their own app (worker.app) from
the same settings.
"""

from __future__ import annotations

import logging
import os

from celery import Celery
from celery.signals import beat_init, celeryd_init, task_postrun, task_prerun

from chain.follow import Doorbell
from core.env import INTERVAL, env_number
from core.queues import DEFAULT_BROKER_URL, PLATFORM_QUEUE, celery_settings, route
from core.worker_steps import stop_promptly

# Read from the same variables as settings.FLEX_SYNC_INTERVAL_S and ETH_RPC_URL: this module
# needs no Django. New blocks send the sync as they come; this tick catches what they missed.
SYNC_INTERVAL_S = env_number("FLEX_SYNC_INTERVAL_S", 5.0, **INTERVAL)
# The shortest time between two syncs the node's new blocks ask for: a round of a small task
# mines a block per update, and a sync of each costs the platform more CPU than it saves a
# live page (which then shows a round at most this much later).
SYNC_SPACING_S = env_number("FLEX_SYNC_SPACING_S", 0.5, kind=float, what="seconds")
# Deadlines are in whole seconds of chain time: a look every second is as soon as any is due.
DEADLINES_INTERVAL_S = env_number("FLEX_DEADLINES_INTERVAL_S", 1.0, **INTERVAL)
ETH_RPC_URL = os.environ.get("ETH_RPC_URL", "http://127.0.0.1:8545")
# Celery's Django fix-up closes every database connection before and after each task, and
# PostgreSQL's connection pool with it (celery/celery#10554): each task of the platform worker
# then opened new PostgreSQL sessions, a server process each. In a prefork worker it is told to
# do so every this many tasks instead (_prefork_keeps_connections).
DB_REUSE_TASKS = 1000


# Beat's heartbeats run every second or so: Celery's own lines for each (sent, received, succeeded)
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
            "schedule": DEADLINES_INTERVAL_S,
            "options": {"queue": PLATFORM_QUEUE, "expires": max(DEADLINES_INTERVAL_S * 5, 5.0)},
        },
    }
    if os.environ.get("DJANGO_SETTINGS_MODULE"):
        from marketplace.gateway import ReportsGateway

        app.autodiscover_tasks(["marketplace"])
        # Devices' reports reach the platform only through the gateway, never as Celery tasks.
        app.steps["consumer"].add(ReportsGateway)
    return stop_promptly(app)


@celeryd_init.connect
def _prefork_keeps_connections(instance=None, options=None, **_) -> None:
    """A platform worker started with the prefork pool (``celery worker``'s default, and the
    stack's) keeps its pool's connections from task to task: the fix-up closes them only every
    DB_REUSE_TASKS tasks, and between, Django's own rule runs at each task's start and end
    (_release_connections). There a task's process runs nothing else that uses the database.
    Another pool runs tasks beside the worker's own consumer: Celery's rule stays."""
    from celery.concurrency.prefork import TaskPool

    if instance is None or (options or {}).get("pool") is not TaskPool:
        return
    # Made from the app's settings as the worker loaded its modules, just before this signal.
    django = [f for f in getattr(instance.app, "_fixups", ()) if hasattr(f, "worker_fixup")]
    for fixup in django:
        fixup.worker_fixup.db_reuse_max = DB_REUSE_TASKS
    if django:
        task_prerun.connect(_release_connections)
        task_postrun.connect(_release_connections)


def _release_connections(sender=None, **_) -> None:
    """At a task's start and end, what Django does at a request's (close_old_connections):
    a connection goes back to PostgreSQL's pool, and one that is broken, or older than
    CONN_MAX_AGE, is closed. Not for a task run in the caller's own thread (``apply``), which
    may be inside the caller's transaction."""
    if getattr(sender.request, "is_eager", False):
        return
    from django.db import close_old_connections

    close_old_connections()


def follow_the_chain(app: Celery, *, rpc_url: str = ETH_RPC_URL) -> Doorbell:
    """Send the chain sync to the platform worker each time the node announces a block (and
    when beat starts): a published global model is mirrored, and the next step sent, without
    waiting for a tick. A sync asked for while one runs is run after it (ChainSync.run), and
    the blocks of a busy moment (a round's updates land together) are synced together, at
    most SYNC_SPACING_S apart: devices hand rounds on by themselves (worker.follow), the
    platform's mirror and messages are the record and the safety net."""

    def ring() -> None:
        app.send_task(
            "marketplace.chain_sync", **route(PLATFORM_QUEUE), expires=max(SYNC_INTERVAL_S, 5.0)
        )

    return Doorbell(
        url=rpc_url, ring=ring, idle_s=SYNC_INTERVAL_S, spacing_s=SYNC_SPACING_S, name="beat-chain"
    ).start()


@beat_init.connect
def _beat_follows_the_chain(sender=None, **_) -> None:
    follow_the_chain(sender.app)


app = platform_app(
    broker_url=os.environ.get("FLEX_BROKER_URL", DEFAULT_BROKER_URL),
    result_backend=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
)
