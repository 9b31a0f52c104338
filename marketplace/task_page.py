"""The live task page's model: the task's representation and what the page shows of it,
computed here once; static/flex/task.js only renders it.

A page's socket first receives the whole task (``task_snapshot_message``), then one delta per
change (``task_delta_message``): the task's scalars and the page's, which are small, and only
the rows of the lists that the change added or changed, which the page merges by key. So what
is pushed for a round does not grow with the rounds before it.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from django.core.cache import cache
from django.db import connection
from django.db.models import Q
from django.utils.dateparse import parse_datetime

from marketplace import contract, selectors
from marketplace.models import (
    SETTLED_STATES,
    ChainEventRecord,
    Device,
    PayoutReason,
    TaskState,
)
from marketplace.selectors import TaskView
from marketplace.serializers import TaskSerializer
from marketplace.task_lists import LIST_CACHE_S

_STEPS = (
    ("posted", "Posted"),
    ("bidding", "Bidding"),
    ("training", "Training"),
    ("trained", "Trained"),
    ("settled", "Finalized"),
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
# A selected trainer is late once this share of the round's timeout has passed without its
# update; at the timeout the aggregator closes the round with the updates that arrived.
LATE_AFTER = 0.5

SNAPSHOT = "task.snapshot"
DELTA = "task.delta"
# The task's lists that grow with its history: a delta carries only their changed rows.
LIST_FIELDS = ("bids", "selected", "rounds_published", "updates", "transactions", "payouts")
# The page's lists derived from them, likewise (the rest of the page's view is scalars).
VIEW_LIST_FIELDS = ("tx_rows", "device_names", "contribution_rounds", "contribution_rows")
# What never changes once the page has a snapshot, left out of deltas.
FIXED_FIELDS = ("spec", "pay_note")
# How long a task's snapshot is kept once built. Whatever changes the task's rows numbers the
# change (marketplace.sync.push), and a new number is a new entry; what the snapshot shows
# that no change numbers (the buyer's user name) is at most this old, as in the task lists.
SNAPSHOT_CACHE_S = LIST_CACHE_S


def task_snapshot_key(view: TaskView, *, seq: int) -> str | None:
    """Where ``task_snapshot`` keeps the task's snapshot as of change ``seq``; None for an
    order not mirrored yet, which is not kept."""
    if view.task is None:
        return None
    # The task's creating transaction too: a chain started afresh numbers its tasks and
    # their changes from 1 again, beside a cache that may still hold the old ones.
    database = connection.settings_dict["NAME"]
    return ":".join(map(str, ("flex:task-snapshot", database, view.id, view.created_tx, seq)))


def task_snapshot(view: TaskView, *, seq: int) -> dict[str, Any]:
    """The task's one representation (serializers.TaskSerializer) as of change ``seq``
    (models_platform.TaskPush, read before ``view``, so that it holds at least that change),
    built once per change: the task page, its API detail and its sockets' first messages are
    then served from the cache until the task changes. At the contract's limits (1,000 bids,
    128 trainers, 100 rounds) building it costs tens of milliseconds of CPU. An order the
    chain sync has not mirrored yet (no numbered changes) is built each time."""
    key = task_snapshot_key(view, seq=seq)

    def built() -> dict[str, Any]:
        return TaskSerializer(view).data

    return built() if key is None else cache.get_or_set(key, built, SNAPSHOT_CACHE_S)


def task_snapshot_message(view: TaskView, *, seq: int) -> dict[str, Any]:
    """The whole task: ``{"type": "task.snapshot", "seq", "snapshot", "view"}``, the snapshot
    being the task's one representation (``task_snapshot``) and ``view`` what the page
    derives from it (``page_view``). ``seq`` is the number of the last change it includes
    (models_platform.TaskPush; read before the task, so the snapshot holds at least that)."""
    snapshot = task_snapshot(view, seq=seq)
    return _message(SNAPSHOT, seq, snapshot, page_view(snapshot))


def task_update_message(view: TaskView, *, seq: int) -> dict[str, Any]:
    """The snapshot as the page is first rendered on the server (as of change ``seq``), without
    a sequence number: the socket's first message brings the numbered one."""
    return {**task_snapshot_message(view, seq=seq), "seq": None}


def page_start(message: dict[str, Any]) -> dict[str, Any]:
    """What the page's script draws before its socket's first message, of ``message`` (the
    page's task_update_message), in the message's shape: the chart's points, and the
    late-round note with the names of the devices it names. The server renders the rest, and
    the socket brings the whole task at once: a task with many rounds, bids and transactions
    is not sent a second time inside its page."""
    points = [
        {key: r[key] for key in ("number", "accuracy", "loss")}
        for r in message["snapshot"]["rounds_published"]
    ]
    wait = message["view"]["round_wait"]
    named = [*wait["missing"], wait["aggregator"]] if wait else []
    names = message["view"]["device_names"]
    return {
        "snapshot": {"rounds_published": points},
        "view": {
            "round_wait": wait,
            "device_names": {a: names[a] for a in named if a in names},
        },
    }


def task_delta_message(
    view: TaskView, *, seq: int, blocks: set[int], rounds: set[int]
) -> dict[str, Any]:
    """Change ``seq`` of a mirrored task: ``{"type": "task.delta", "seq", "snapshot", "view"}``
    shaped as a snapshot, whose scalars are the task's now and whose lists hold only the rows
    that the chain events in ``blocks`` wrote and the ``rounds`` whose reports arrived (keyed:
    a bid or a selected node by device, a round by number, an update by round and trainer, a
    transaction or a payout by transaction and log index, a transaction row by transaction, a
    contribution row by trainer with cells for the delta's ``contribution_rounds``), less
    what never changes (``FIXED_FIELDS``)."""
    task = view.task
    at = Q(block_number__in=sorted(blocks))
    selected = list(task.selected.order_by("role", "position"))
    changed_rounds = list(
        task.round_set.select_related("report")
        .filter(at | Q(number__in=sorted(rounds)))
        .order_by("number")
    )
    payouts = list(task.payouts.filter(at).order_by("block_number", "log_index"))
    # The task's totals, read once for both views below.
    counts = {
        "bid_count": view.bid_count,
        "update_count": view.update_count,
        "transaction_count": view.transaction_count,
    }
    changed = _view_with(
        view,
        **counts,
        bids=list(task.bids.filter(at).order_by("bid_index")),
        selected=[n for n in selected if n.block_number in blocks],
        rounds_published=changed_rounds,
        updates=list(
            task.updates.select_related("report").filter(at).order_by("round_number", "position")
        ),
        transactions=list(
            ChainEventRecord.objects.filter(
                task_id=view.id, block_number__in=sorted(blocks)
            ).order_by("block_number", "log_index")
        ),
        payouts=payouts,
    )
    # Contributions: every selected trainer's cells for the rounds this change judged, and its
    # pay once the task is settled (TaskView.contributions, over just those rows).
    settled = view.state in SETTLED_STATES
    judged = [r for r in changed_rounds if r.number >= 1]
    changed.__dict__["contributions"] = (
        _view_with(
            view,
            selected=selected,
            rounds_published=judged,
            payouts=list(task.payouts.filter(reason=PayoutReason.TRAINER_PAY)) if settled else [],
        ).contributions
        if judged or (settled and payouts)
        else []
    )
    rows = TaskSerializer(changed).data
    # The page's scalars need a little context beyond the change: every selected node, the
    # round under way and its updates, the latest measured round, the refunds.
    current = view.current_round
    with_report = task.round_set.select_related("report")
    measured = with_report.filter(number__gte=1, report__accuracy__isnull=False)
    under_way = with_report.filter(number=current) if current is not None else []
    # A trained task's final model: its time says when the task settles.
    final = with_report.filter(number=view.rounds) if view.state == TaskState.TRAINED else []
    context_rounds = {r.number: r for r in (*measured.order_by("-number")[:3], *under_way, *final)}
    context = _view_with(
        view,
        **counts,
        bids=[],
        selected=selected,
        rounds_published=[context_rounds[n] for n in sorted(context_rounds)],
        updates=list(task.updates.filter(round_number=current)) if current is not None else [],
        transactions=[],
        payouts=list(task.payouts.filter(reason=PayoutReason.REFUND)),
        contributions=[],
    )
    scalars = TaskSerializer(context).data
    snapshot = {**scalars, **{name: rows[name] for name in (*LIST_FIELDS, "contributions")}}
    page = page_view(scalars)
    rows_view = page_view(snapshot)
    page.update({name: rows_view[name] for name in VIEW_LIST_FIELDS})
    for name in FIXED_FIELDS:
        snapshot.pop(name, None)
        page.pop(name, None)
    return _message(DELTA, seq, snapshot, page)


def _view_with(view: TaskView, **rows: Any) -> TaskView:
    """``view`` with these rows as its lists and counts (TaskView's cached properties, filled
    in)."""
    part = TaskView(task=view.task, order=view.order)
    part.__dict__.update(rows)
    return part


def _message(kind: str, seq: int | None, snapshot: dict, page: dict) -> dict[str, Any]:
    if page["round_wait"] is not None:
        # Round deadlines run on the chain's clock; the page compares them with its own.
        page["round_wait"]["clock_offset_s"] = contract.chain_clock_offset()
    return {"type": kind, "seq": seq, "snapshot": snapshot, "view": page}


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
    elif state == "trained":
        # Settled (pay, stakes, refund) only once no one can prove the final model wrong.
        settles = settles_after(snapshot)
        note = "all rounds done" + (
            f"; settled after {settles:%Y-%m-%d %H:%M} UTC, when the final model's dispute "
            "window closes"
            if settles
            else ""
        )
    elif state == "finalized":
        note = "all rounds done"
    else:
        note = ""
    challenged = snapshot.get("challenged_round")
    if challenged is not None:
        # A challenge proved a global model wrong: say so where the page says what happened.
        steps[at]["label"] = "Aggregate challenged"
        note = f"aggregate of round {challenged} challenged: aggregator slashed"
    refund = snapshot["refund_wei"]
    return {
        "steps": steps,
        "tx_rows": transaction_rows(snapshot["transactions"]),
        # How much of the lists that grow with the rounds the page keeps as deltas come.
        "shown": {
            "bids": selectors.BIDS_SHOWN,
            "transactions": selectors.TRANSACTIONS_SHOWN,
            "update_rounds": selectors.UPDATE_ROUNDS_SHOWN,
            "contribution_rounds": selectors.CONTRIBUTION_ROUNDS_SHOWN,
        },
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
        "round_wait": round_wait(snapshot),
        # The aggregator is selected too, but buyers count trainers.
        "trainers_selected": sum(1 for n in snapshot["selected"] if n["role"] == "trainer"),
    }


def settles_after(snapshot: dict) -> datetime | None:
    """When a trained task may be finalized: its final model's block time plus the dispute
    window (the chain's clock); None in any other state or before that model is mirrored."""
    if snapshot["state"] != "trained":
        return None
    rounds = snapshot["rounds_published"]
    final = next((r for r in rounds if r["number"] == snapshot["rounds"]), None)
    published = final and final.get("published_at")
    if not published:
        return None
    return parse_datetime(published) + timedelta(seconds=snapshot["dispute_window_s"])


def round_wait(snapshot: dict) -> dict[str, Any] | None:
    """The round the trainers work on now, while the task runs: when it began (its global
    model's block time, unix seconds), when updates are expected and due, and which selected
    trainers have sent none yet. The page warns once ``expected_by`` has passed with trainers
    ``missing``, and when the aggregator has not published by half its own time after the
    ``deadline`` (the contract wants the next model by ``publish_due``, else it aborts)."""
    number = snapshot["current_round"]
    if snapshot["state"] != "running" or number is None:
        return None
    model = next((r for r in snapshot["rounds_published"] if r["number"] == number), None)
    began = parse_datetime(model["published_at"]) if model and model.get("published_at") else None
    if began is None:
        return None
    started = began.timestamp()
    timeout = snapshot["round_timeout_s"]
    sent = {u["trainer"] for u in snapshot["updates"] if u["round"] == number}
    return {
        "round": number + 1,
        "started_at": started,
        "expected_by": started + timeout * LATE_AFTER,
        "deadline": started + timeout,
        "publish_due": started + 2 * timeout,
        "aggregator": snapshot["aggregator"],
        "missing": [
            n["device"]
            for n in snapshot["selected"]
            if n["role"] == "trainer" and n["device"] not in sent
        ],
    }


PAY_NOTE = (
    "Each round the contract shares a pool of half the aggregated trainers' prices in "
    "proportion to these scores, each update's Shapley value on your validation set (no share "
    "above the trainer's price); a left-out update earns nothing that round."
)


def contribution_rounds(snapshot: dict) -> list[int]:
    """The last CONTRIBUTION_ROUNDS_SHOWN (selectors) rounds whose updates have been judged
    (their next global model is out), by the chain's number: the round updates are trained
    in, one less than the global model they go into. The page heads each with the latter,
    the number the rounds table and the progress count by."""
    judged = [r["number"] - 1 for r in snapshot["rounds_published"] if r["number"] >= 1]
    return judged[-selectors.CONTRIBUTION_ROUNDS_SHOWN :]


def contribution_rows(snapshot: dict) -> list[dict]:
    """Per trainer, one cell per judged round shown (its share of the round's scores, "left
    out" with the reason stated on chain for a submitted update, or "unscored"), in how many
    judged rounds it was aggregated, and the pay credited to it."""
    rows = []
    for c in snapshot["contributions"]:
        cells = []
        for r in c["rounds"]:
            if not r["aggregated"]:
                cells.append(f"left out: {r['left_out']}" if r.get("left_out") else "left out")
            elif r["score"] is None:
                cells.append("unscored")
            else:
                cells.append(f"{r['share_bp'] // 100}.{r['share_bp'] % 100:02d} % ({r['score']})")
        rows.append(
            {
                "trainer": c["trainer"],
                "cells": cells,
                "rounds_aggregated": c["rounds_aggregated"],
                "paid_wei": c["paid_wei"],
            }
        )
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
