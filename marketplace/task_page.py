"""The live task page's model: the task's representation and what the page shows of it,
computed here once, sent whole on every change; static/flex/task.js only renders it."""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any

from marketplace.models import Device
from marketplace.selectors import TaskView
from marketplace.serializers import TaskSerializer

_STEPS = (
    ("posted", "Posted"),
    ("bidding", "Bidding"),
    ("training", "Training"),
    ("trained", "Trained"),
    ("settled", "Settled"),
)
# state -> (index of the step it is at, whether that step ended badly, its label there)
_AT = {
    "pending": (0, False, "Posting"),
    "bidding": (1, False, None),
    "running": (2, False, None),
    "trained": (3, False, None),
    "finalized": (5, False, None),
    "cancelled": (1, True, "Cancelled"),
    "failed": (2, True, "Selection failed"),
    "aborted": (2, True, "Aborted"),
}


def task_update_message(view: TaskView) -> dict[str, Any]:
    """What the page's socket receives: ``{"type": "task.update", "as_of", "snapshot",
    "view"}``, the snapshot being the task's one representation (serializers.TaskSerializer)
    and ``view`` what the page derives from it (``page_view``). ``as_of`` is the unix time it
    was taken: a page keeps the newest."""
    snapshot = TaskSerializer(view).data
    return {
        "type": "task.update",
        "as_of": time.time(),
        "snapshot": snapshot,
        "view": page_view(snapshot),
    }


def page_view(snapshot: dict) -> dict[str, Any]:
    """Progress steps, the latest metrics, the transactions by row and the devices' names."""
    state = snapshot["state"]
    at, bad, label = _AT.get(state, (0, False, None))
    steps = []
    for i, (key, text) in enumerate(_STEPS):
        status = "done" if i < at else ("bad" if bad else "now") if i == at else ""
        steps.append({"key": key, "label": label if i == at and label else text, "status": status})
    rounds = snapshot["rounds_published"]
    measured = [r for r in rounds if r["number"] >= 1 and r["accuracy"] is not None]
    latest = measured[-1] if measured else None
    if state == "bidding":
        note = "bidding open"
    elif state == "running" and snapshot["current_round"] is not None:
        note = f"training round {snapshot['current_round'] + 1} of {snapshot['rounds']}"
    elif state in ("trained", "finalized"):
        note = "all rounds done"
    else:
        note = ""
    refund = snapshot["refund_wei"]
    return {
        "steps": steps,
        "tx_rows": transaction_rows(snapshot["transactions"]),
        "done_rounds": max(snapshot["published_rounds"] - 1, 0),
        "round_note": note,
        "latest_accuracy": latest["accuracy"] if latest else None,
        "latest_loss": latest["loss"] if latest else None,
        "model_ready": state in ("trained", "finalized"),
        "refunded": refund is not None and int(refund) > 0,
        "device_names": device_names(snapshot),
        "contribution_rounds": contribution_rounds(snapshot),
        "contribution_rows": contribution_rows(snapshot),
        "pay_note": PAY_NOTE,
    }


PAY_NOTE = (
    "Each round the contract shares the pool of the aggregated trainers' prices by these "
    "scores, each update's Shapley value on your validation set, under its pay rule; a "
    "left-out update earns nothing that round."
)


def contribution_rounds(snapshot: dict) -> list[int]:
    """The rounds whose updates have been judged (their next global model is out)."""
    return [r["number"] - 1 for r in snapshot["rounds_published"] if r["number"] >= 1]


def contribution_rows(snapshot: dict) -> list[dict]:
    """Per trainer, one cell per judged round (its share of the round's scores, "left out",
    or "paid its price" when the round was unscored) and the pay credited to it."""
    rows = []
    for c in snapshot["contributions"]:
        cells = []
        for r in c["rounds"]:
            if not r["aggregated"]:
                cells.append("left out")
            elif r["score"] is None:
                cells.append("unscored")
            else:
                cells.append(f"{r['share_bp'] // 100}.{r['share_bp'] % 100:02d} % ({r['score']})")
        rows.append({"trainer": c["trainer"], "cells": cells, "paid_wei": c["paid_wei"]})
    return rows


def event_label(name: str) -> str:
    """``GlobalModelPublished`` -> ``Global model published``."""
    words = re.sub(r"(?<!^)(?=[A-Z])", " ", name).split()
    return " ".join([words[0], *(w.lower() for w in words[1:])]) if words else name


def transaction_rows(events: list[dict]) -> list[dict]:
    """One row per transaction, in chain order, naming the events it emitted."""
    rows: dict[str, dict] = {}
    for event in events:
        row = rows.setdefault(
            event["tx_hash"],
            {"tx_hash": event["tx_hash"], "block_number": event["block_number"], "names": []},
        )
        row["names"].append(event["name"])
    for row in rows.values():
        counts = Counter(row["names"])
        row["label"] = " · ".join(
            f"{n}\u00d7 {event_label(name).lower()}" if n > 1 else event_label(name)
            for name, n in counts.items()
        )
    return list(rows.values())


def device_names(snapshot: dict) -> dict[str, str]:
    """Enrolled devices' names by address, for those the task's tables show."""
    addresses = (
        {b["device"] for b in snapshot["bids"]}
        | {n["device"] for n in snapshot["selected"]}
        | {p["account"] for p in snapshot["payouts"]}
    )
    return dict(Device.objects.filter(address__in=addresses).values_list("address", "name"))
