"""Marketplace reads: a task as its buyer sees it, and the chain-sync status."""

from __future__ import annotations

import time
from typing import Any

from marketplace.models import ChainCursor, ChainEventRecord, Payout, PayoutReason, Task, TaskState


def _wei(value: int | None) -> str | None:
    return None if value is None else str(value)


def _iso(value) -> str | None:
    return None if value is None else value.isoformat()


def task_get_for_viewer(*, task_id: int, user) -> Task | None:
    """The task (by primary key) if ``user`` may watch it: its buyer, or staff."""
    if user is None or not user.is_authenticated:
        return None
    task = Task.objects.filter(pk=task_id).first()
    if task is None or not (user.is_staff or task.buyer_id == user.pk):
        return None
    return task


def task_snapshot(task: Task) -> dict[str, Any]:
    """Everything the live task page shows, as plain JSON; pushed on every mirror change.

    The shape is stable (the task page and the WebSocket render the same dict). Amounts are
    decimal strings of wei (exact where JSON numbers are not), times ISO 8601 in UTC, model
    IDs and hashes ``0x`` hex, addresses checksummed::

        id                int, the Task row's primary key (the page's and socket's id)
        chain_task_id     int | None (None while the creating transaction is unseen)
        title, state      str; state is one of TaskState's values
        buyer             address
        spec_hash         str
        budget_wei        str
        round_count       int, rounds ordered
        published_rounds  int, global models published (round 0 is the initial model)
        current_round     int | None, the round trainers work on now (while running)
        min_trainers, max_trainers, round_timeout_s   int
        bidding_ends      ISO time
        failure_reason    str ("" unless failed)
        aggregator        {device, price_per_round_wei} | None
        bids              [{device, bid_index, role, price_per_round_wei, samples,
                            tx_hash, block}]
        selected          [{device, role, position, price_per_round_wei, tx_hash}]
                          (position is None for the aggregator)
        rounds            [{number, global_model_id, accuracy, loss, updates_aggregated,
                            aggregated_mask, gas_used, tx_hash, block, published_at}]
                          (accuracy, loss, gas_used None until the aggregator reports)
        updates           [{round, trainer, position, model_id, tx_hash, block}]
        transactions      [{name, tx_hash, block, log_index, args}], every contract event
                          of the task in chain order; args as ChainEventRecord.args
        payouts           [{account, amount_wei, reason, tx_hash, block}];
                          reason "trainer" | "aggregator" | "refund"
        trainers_paid_wei, aggregator_paid_wei, refunded_wei   str | None (at settlement)
        refund_wei        str | None, everything credited back to the buyer (also for
                          cancelled and failed tasks)
        as_of             float, unix time the snapshot was taken (newer wins)
    """
    chain_id = task.chain_task_id
    payouts = list(Payout.objects.filter(task=task).order_by("block_number", "log_index"))
    refunds = [p.amount_wei for p in payouts if p.reason == PayoutReason.REFUND]
    events = (
        ChainEventRecord.objects.filter(task_id=chain_id).order_by("block_number", "log_index")
        if chain_id is not None
        else ChainEventRecord.objects.none()
    )
    running = task.state == TaskState.RUNNING and task.published_rounds > 0
    return {
        "id": task.pk,
        "chain_task_id": chain_id,
        "title": task.title,
        "state": task.state,
        "buyer": task.buyer_address,
        "spec_hash": task.spec_hash,
        "budget_wei": _wei(task.budget_wei),
        "round_count": task.rounds,
        "published_rounds": task.published_rounds,
        "current_round": task.published_rounds - 1 if running else None,
        "min_trainers": task.min_trainers,
        "max_trainers": task.max_trainers,
        "round_timeout_s": task.round_timeout_s,
        "bidding_ends": _iso(task.bidding_ends),
        "failure_reason": task.failure_reason,
        "aggregator": (
            {"device": task.aggregator, "price_per_round_wei": _wei(task.aggregator_price_wei)}
            if task.aggregator
            else None
        ),
        "bids": [
            {
                "device": b.device,
                "bid_index": b.bid_index,
                "role": b.role,
                "price_per_round_wei": _wei(b.price_per_round_wei),
                "samples": b.samples,
                "tx_hash": b.tx_hash,
                "block": b.block_number,
            }
            for b in task.bids.order_by("bid_index")
        ],
        "selected": [
            {
                "device": n.device,
                "role": n.role,
                "position": n.position,
                "price_per_round_wei": _wei(n.price_per_round_wei),
                "tx_hash": n.tx_hash,
            }
            for n in task.selected.order_by("role", "position")
        ],
        "rounds": [
            {
                "number": r.number,
                "global_model_id": r.global_model_id,
                "accuracy": r.accuracy,
                "loss": r.loss,
                "updates_aggregated": r.updates_aggregated,
                "aggregated_mask": r.aggregated_mask,
                "gas_used": r.gas_used,
                "tx_hash": r.tx_hash,
                "block": r.block_number,
                "published_at": _iso(r.published_at),
            }
            for r in task.round_set.order_by("number")
        ],
        "updates": [
            {
                "round": u.round_number,
                "trainer": u.trainer,
                "position": u.position,
                "model_id": u.model_id,
                "tx_hash": u.tx_hash,
                "block": u.block_number,
            }
            for u in task.updates.order_by("round_number", "position")
        ],
        "transactions": [
            {
                "name": e.name,
                "tx_hash": e.tx_hash,
                "block": e.block_number,
                "log_index": e.log_index,
                "args": e.args,
            }
            for e in events
        ],
        "payouts": [
            {
                "account": p.account,
                "amount_wei": _wei(p.amount_wei),
                "reason": p.reason,
                "tx_hash": p.tx_hash,
                "block": p.block_number,
            }
            for p in payouts
        ],
        "trainers_paid_wei": _wei(task.trainers_paid_wei),
        "aggregator_paid_wei": _wei(task.aggregator_paid_wei),
        "refunded_wei": _wei(task.refunded_wei),
        "refund_wei": _wei(sum(refunds)) if refunds else None,
        "as_of": time.time(),
    }


def chain_cursor_get(*, contract_address: str) -> ChainCursor | None:
    """How far chain sync has mirrored the contract, if it has started."""
    return ChainCursor.objects.filter(contract_address=contract_address).first()
