"""Stopping a long-running command (the local chain, the local stack) on SIGINT or SIGTERM."""

from __future__ import annotations

import signal
import threading


class Stopper:
    """SIGINT and SIGTERM for a command that starts something, then waits until told to stop.

    While it starts, the first signal raises KeyboardInterrupt wherever the start is, so that
    the start's own clean-up stops what it had begun, instead of the whole thing coming up
    first. Once ``started()`` (call it in the clean-up too), or once stopping, a signal only
    sets ``stopping``, which the wait watches: a second Ctrl-C never cuts a clean-up short.
    Main thread only, as Python's signal handlers are."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self._starting = True
        signal.signal(signal.SIGINT, self._signalled)
        signal.signal(signal.SIGTERM, self._signalled)

    def started(self) -> None:
        self._starting = False

    def _signalled(self, *_: object) -> None:
        starting, self._starting = self._starting, False
        self.stopping.set()
        if starting:
            raise KeyboardInterrupt
