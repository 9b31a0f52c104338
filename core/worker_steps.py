"""A step every FLEX Celery worker (the platform's, each node's) runs with.

Celery's event loop waits on the broker's socket until its next timer is due, up to ten
seconds when nothing is scheduled, and sees a stop signal only once it wakes: a worker asked
to stop (Ctrl-C on `make run`, a restart, a device's owner stopping it) sat that long before it
even began to finish its work. A timer every STOP_CHECK_S wakes it to look.
"""

from __future__ import annotations

from celery import Celery, bootsteps

STOP_CHECK_S = 0.5


def _look() -> None:
    """Nothing to do: waking the loop is the point, and it checks for a stop on every turn."""


class PromptStop(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Hub"}

    def start(self, worker) -> None:
        worker.hub.call_repeatedly(STOP_CHECK_S, _look)


def stop_promptly(app: Celery) -> Celery:
    app.steps["worker"].add(PromptStop)
    return app
