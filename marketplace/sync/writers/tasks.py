"""Task rows: created, nodes selected, failed, cancelled, finalized or aborted."""

from __future__ import annotations

from marketplace.models import Role, SelectedNode, Task, TaskState, Wallet
from marketplace.sync.records import MirrorEvent, when


def task_created(mirror, e: MirrorEvent) -> None:
    a = e.args
    task = mirror.task(a["task_id"]) or Task(chain_task_id=a["task_id"])
    # The website account whose wallet paid, if it is one of the website's wallets.
    wallet = Wallet.objects.filter(address=a["buyer"]).first()
    task.buyer_id = wallet.user_id if wallet is not None else None
    task.buyer_address = a["buyer"]
    task.spec_hash = a["spec_hash"]
    task.budget_wei = int(a["budget_wei"])
    task.rounds = a["rounds"]
    task.min_trainers = a["min_trainers"]
    task.max_trainers = a["max_trainers"]
    task.bidding_ends = when(a["bidding_ends"])
    task.round_timeout_s = a["round_timeout"]
    task.sample_cap = a["sample_cap"]
    task.created_tx = e.tx_hash
    task.created_block = e.block_number
    task.state = TaskState.BIDDING
    if task.pk is None:
        task.save()  # later events of this chunk hang their rows off it
    mirror.tasks[task.chain_task_id] = task
    mirror.changed(task)


def nodes_selected(mirror, e: MirrorEvent) -> None:
    task = mirror.task_of(e)
    if task is None:
        return
    a = e.args
    task.aggregator = a["aggregator"]
    task.aggregator_price_wei = int(a["aggregator_price_wei"])
    task.selected_at = when(mirror.block_times.get(e.block_number)) or task.selected_at
    task.state = TaskState.RUNNING
    where = {"task": task, "tx_hash": e.tx_hash, "block_number": e.block_number}
    nodes = [
        SelectedNode(
            device=a["aggregator"],
            role=Role.AGGREGATOR,
            price_per_round_wei=task.aggregator_price_wei,
            **where,
        )
    ]
    for position, (device, price) in enumerate(
        zip(a["trainers"], a["trainer_prices_wei"], strict=True)
    ):
        nodes.append(
            SelectedNode(
                device=device,
                role=Role.TRAINER,
                position=position,
                price_per_round_wei=int(price),
                **where,
            )
        )
    SelectedNode.objects.bulk_create(nodes)
    mirror.changed(task)


def task_failed(mirror, e: MirrorEvent) -> None:
    task = mirror.task_of(e)
    if task is not None:
        task.state = TaskState.FAILED
        task.failure_reason = e.args["reason"]
        mirror.changed(task)


def task_cancelled(mirror, e: MirrorEvent) -> None:
    task = mirror.task_of(e)
    if task is not None:
        task.state = TaskState.CANCELLED
        mirror.changed(task)


def task_settled(mirror, e: MirrorEvent) -> None:
    task = mirror.task_of(e)
    if task is None:
        return
    a = e.args
    task.state = TaskState.FINALIZED if e.name == "TaskFinalized" else TaskState.ABORTED
    task.trainers_paid_wei = int(a["trainers_paid_wei"])
    task.aggregator_paid_wei = int(a["aggregator_paid_wei"])
    task.refunded_wei = int(a["refunded_wei"])
    task.slashed_wei = int(a["slashed_wei"])
    if "published_rounds" in a:
        task.published_rounds = a["published_rounds"]
    mirror.changed(task)


def dispute_terms_set(mirror, e: MirrorEvent) -> None:
    task = mirror.task_of(e)
    if task is not None:
        task.dispute_window_s = e.args["dispute_window"]
        mirror.changed(task)


def aggregate_challenged(mirror, e: MirrorEvent) -> None:
    task = mirror.task_of(e)
    if task is None:
        return
    a = e.args
    task.challenged_round = a["round"]
    task.challenged_by = a["challenger"]
    task.challenge_bounty_wei = int(a["bounty_wei"])
    task.challenge_tx = e.tx_hash
    mirror.changed(task)


WRITERS = {
    "TaskCreated": task_created,
    "DisputeTermsSet": dispute_terms_set,
    "AggregateChallenged": aggregate_challenged,
    # A contested exclusion ends the task as a wrong aggregate does: same fields.
    "ExclusionContested": aggregate_challenged,
    "NodesSelected": nodes_selected,
    "TaskFailed": task_failed,
    "TaskCancelled": task_cancelled,
    "TaskFinalized": task_settled,
    "TaskAborted": task_settled,
}
