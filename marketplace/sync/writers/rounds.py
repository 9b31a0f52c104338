"""Round and Update rows: each global model published, each trainer's update submitted."""

from __future__ import annotations

from chain.fraud import ZERO_ID, Exclusion
from marketplace.models import Round, TaskState, Update
from marketplace.sync.records import MirrorEvent, when


def global_model_published(mirror, e: MirrorEvent) -> None:
    task = mirror.task_of(e)
    if task is None:
        return
    a = e.args
    number, mask = a["round"], int(a["aggregated_mask"])
    row = Round.objects.filter(task=task, number=number).first() or Round(task=task, number=number)
    row.global_model_id = a["model_id"]
    row.aggregated_mask = str(mask)
    row.updates_aggregated = mask.bit_count()
    row.scores = [int(score) for score in a.get("scores", ())]
    row.tx_hash, row.block_number = e.tx_hash, e.block_number
    row.published_at = when(mirror.block_times.get(e.block_number)) or row.published_at
    row.save()
    task.published_rounds = number + 1
    if task.aggregator:
        mirror.mirrored.append(("round", task.chain_task_id, number, task.aggregator))
    if number == task.rounds:
        task.state = TaskState.TRAINED
    mirror.changed(task)


def update_submitted(mirror, e: MirrorEvent) -> None:
    task = mirror.task_of(e)
    if task is None:
        return
    a = e.args
    Update.objects.update_or_create(
        task=task,
        round_number=a["round"],
        trainer=a["trainer"],
        defaults={
            "position": a["position"],
            "model_id": a["model_id"],
            "tx_hash": e.tx_hash,
            "block_number": e.block_number,
        },
    )
    mirror.touched.add(task.chain_task_id)
    mirror.mirrored.append(("update", task.chain_task_id, a["round"], a["trainer"]))


def updates_excluded(mirror, e: MirrorEvent) -> None:
    """Global model ``round`` left round-1 updates out: each one's row says why."""
    task = mirror.task_of(e)
    if task is None:
        return
    for left in Exclusion.decode_all(e.args["statement"]):
        Update.objects.filter(
            task=task, round_number=e.args["round"] - 1, position=left.position
        ).update(
            exclusion_reason=left.reason.name.lower(),
            exclusion_evidence="" if left.evidence == ZERO_ID else left.evidence,
        )
    mirror.touched.add(task.chain_task_id)


WRITERS = {
    "GlobalModelPublished": global_model_published,
    "UpdateSubmitted": update_submitted,
    "UpdatesExcluded": updates_excluded,
}
