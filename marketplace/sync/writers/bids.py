"""Bid rows: a device's current bid on a task (buffered, written in bulk by the mirror)."""

from __future__ import annotations

from marketplace.models import Bid, Role
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
        "deposit_wei": int(a["deposit_wei"]),
        "tx_hash": e.tx_hash,
        "block_number": e.block_number,
    }
    mirror.touched.add(task.chain_task_id)


def bid_withdrawn(mirror, e: MirrorEvent) -> None:
    """The bid is gone; the task's last bid moved into its index."""
    task = mirror.task_of(e)
    if task is None:
        return
    a = e.args
    mirror.bids.pop((task.pk, a["device"]), None)
    Bid.objects.filter(task=task, device=a["device"]).delete()
    moved = a["moved_device"]
    if int(moved, 16):
        buffered = mirror.bids.get((task.pk, moved))
        if buffered is not None:
            buffered["bid_index"] = a["bid_index"]
        Bid.objects.filter(task=task, device=moved).update(bid_index=a["bid_index"])
    mirror.touched.add(task.chain_task_id)


WRITERS = {"BidPlaced": bid_placed, "BidWithdrawn": bid_withdrawn}
