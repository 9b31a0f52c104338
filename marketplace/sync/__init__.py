"""Chain sync: the scanner (cursor, chunks, re-org rewind), the mirror writers (one module per
event family, in ``writers``) and the push of each change to the task's live pages.

Sync is the only writer of mirror rows (see marketplace.models).
"""

from marketplace.sync.records import MirrorEvent, event_args
from marketplace.sync.scanner import ChainSync, SyncResult, chain_sync, chain_sync_watch

__all__ = ["ChainSync", "MirrorEvent", "SyncResult", "chain_sync", "chain_sync_watch", "event_args"]
