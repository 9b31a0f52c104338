"""Bid rows: a device's current bid on a task (buffered, written in bulk by the mirror)."""

from __future__ import annotations

from marketplace.models import Role
from marketplace.sync.records import MirrorEvent


def bid_placed(mirror, e: MirrorEvent) -> None:
    task = mirror.task_of(e)
    if task is None:
        return
    a = e.args
    mirror.bids[(task.pk, a["device"])] = {
        "bid_index": a["bid_index"],
        "role": Role(a["role"]),
        "price_per_round_wei": int(a["price_per_round_wei"]),
        "samples": a["samples"],
        "tx_hash": e.tx_hash,
        "block_number": e.block_number,
    }
    mirror.touched.add(task.chain_task_id)


WRITERS = {"BidPlaced": bid_placed}
