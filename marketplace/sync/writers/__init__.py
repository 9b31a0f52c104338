"""The mirror writers, one module per event family; each writer is ``(mirror, event) -> None``."""

from __future__ import annotations

from marketplace.sync.writers import bids, devices, payouts, rounds, tasks

WRITERS = {**tasks.WRITERS, **bids.WRITERS, **rounds.WRITERS, **payouts.WRITERS, **devices.WRITERS}
