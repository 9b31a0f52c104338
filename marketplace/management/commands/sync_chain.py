"""Mirror the FlexMarket contract's events into the database: one run, or --watch."""

import signal
import threading

from django.core.management.base import BaseCommand, CommandError

from core.errors import FlexError
from marketplace.sync import SyncResult, chain_sync, chain_sync_watch


def _line(result: SyncResult) -> str:
    if result.status != "synced":
        return f"sync: {result.status} (another run holds the lock)"
    lag = "" if result.lag_ms is None else f", lag {result.lag_ms:.0f} ms"
    rewinds = f", {result.rewinds} re-org rewind(s)" if result.rewinds else ""
    return (
        f"sync: {result.events} new event(s) in {result.chunks} chunk(s), "
        f"mirrored to block {result.to_block} of {result.head} in {result.seconds:.2f}s"
        f"{lag}{rewinds}"
    )


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser):
        parser.add_argument(
            "--watch",
            action="store_true",
            help="keep syncing whenever the node announces a new block, until interrupted",
        )
        parser.add_argument(
            "--poll",
            type=float,
            default=None,
            help="with --watch: look at least this often (seconds) even when the node announces "
            "nothing (default FLEX_SYNC_INTERVAL_S)",
        )

    def handle(self, *args, watch, poll, **options):
        if not watch:
            try:
                result = chain_sync()
            except FlexError as exc:
                raise CommandError(f"{exc.code}: {exc.message}") from exc
            self.stdout.write(_line(result))
            return
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())

        def report(result: SyncResult) -> None:
            if result.events or result.rewinds:
                self.stdout.write(_line(result))

        self.stdout.write("watching the chain for new blocks (Ctrl-C stops)")
        chain_sync_watch(poll_s=poll, stop=stop, on_result=report)
