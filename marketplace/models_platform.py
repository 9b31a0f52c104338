"""The rows the platform writes itself, apart from the chain mirror (marketplace.models): what
nodes report about their work, the lifecycle steps fired, and buyers' validation sets."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from marketplace.models import Round, Task, Update


class RoundReport(models.Model):
    """What a round's aggregator measured for its global model, as it reported it.

    Kept for the model ID and transaction the chain had when it arrived; it is the round's
    metrics only while the round still has that model (``Round.metrics``), so a re-org that
    replaces the model leaves it unused until the new model's report arrives.
    """

    round = models.OneToOneField(Round, on_delete=models.CASCADE, related_name="report")
    model_id = models.CharField(max_length=66)
    tx_hash = models.CharField(max_length=66)
    accuracy = models.FloatField(null=True, blank=True)
    loss = models.FloatField(null=True, blank=True)
    gas_used = models.PositiveBigIntegerField(null=True, blank=True)
    reported_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"report on {self.round}"


class UpdateReport(models.Model):
    """What a trainer measured on its own data for its update (checked by nobody)."""

    update = models.OneToOneField(Update, on_delete=models.CASCADE, related_name="report")
    model_id = models.CharField(max_length=66)
    num_examples = models.PositiveIntegerField(null=True, blank=True)
    loss = models.FloatField(null=True, blank=True)
    accuracy = models.FloatField(null=True, blank=True)
    train_s = models.FloatField(null=True, blank=True, help_text="Local training time.")
    reported_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"report on {self.update}"


class LifecycleAction(models.Model):
    """A lifecycle step the platform fired for a task, at most once per (task, action, round).

    Device messages are recorded in the transaction that mirrors the event causing them
    (``tx_hash`` is that event's transaction); platform transactions once they are mined
    (``tx_hash`` is the platform's own transaction). A re-org that orphans that transaction
    deletes the row, so the step may fire again on the new branch.
    """

    class Action(models.TextChoices):
        NOTIFY_BIDS = "notify_bids", "Devices asked to bid"
        SELECT_NODES = "select_nodes", "Node selection"
        PUBLISH_INITIAL = "publish_initial", "Initial model requested"
        START_ROUND = "start_round", "Round started"
        FINALIZE = "finalize", "Finalized"
        ABORT = "abort", "Aborted"

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="actions")
    action = models.CharField(max_length=20, choices=Action.choices)
    round_number = models.PositiveIntegerField(default=0)
    tx_hash = models.CharField(max_length=66, blank=True, db_index=True)
    detail = models.JSONField(default=dict, blank=True)
    fired_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["task", "fired_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["task", "action", "round_number"], name="lifecycle_action_once"
            )
        ]

    def __str__(self) -> str:
        return f"{self.action} (round {self.round_number}) of {self.task}"


class ValidationSet(models.Model):
    """A buyer's validation set in its canonical bytes (training.validation), kept under its
    content ID, which task specs commit to; the aggregator of such a task fetches it here."""

    content_id = models.CharField(max_length=66, unique=True)
    dataset = models.CharField(max_length=40, help_text="The schema its samples fit.")
    samples = models.PositiveIntegerField()
    data = models.BinaryField()
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    # Only they may name it in a task: its aggregator is sent the samples, so naming someone
    # else's set would hand their data to an aggregator of one's choosing.
    uploaded_by = models.ManyToManyField(
        settings.AUTH_USER_MODEL, blank=True, related_name="validation_sets"
    )

    def __str__(self) -> str:
        return f"validation set {self.content_id} ({self.samples} samples of {self.dataset})"


class TaskPush(models.Model):
    """How many changes of a task have been pushed to its live pages: the sequence number of
    the last one (marketplace.sync.push). Raised in the transaction that makes the change,
    by whichever process makes it (chain sync, a node's report), so numbers never repeat and a
    page that misses one sees the gap. Keyed by the task's id on chain, which a buyer's order
    has before the mirror does, and kept when a re-org removes the task."""

    chain_task_id = models.PositiveBigIntegerField(primary_key=True)
    seq = models.PositiveBigIntegerField(default=0)

    def __str__(self) -> str:
        return f"task {self.chain_task_id} pushed up to {self.seq}"


class ModelCheck(models.Model):
    """The platform's check of a task's final model against the chain, on the buyer's
    behalf (marketplace.model_check): recomputed from the last round's updates and the
    weights on chain, chunk by chunk, and compared with the model ID. The model card calls
    the model verified only when this says so."""

    class State(models.TextChoices):
        CHECKING = "checking", "Checking"
        VERIFIED = "verified", "Verified"
        WRONG = "wrong", "Not verified: the aggregate differs"
        UNCHECKED = "unchecked", "Not verified: could not be checked"

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="model_checks")
    model_id = models.CharField(max_length=66, unique=True)
    state = models.CharField(max_length=10, choices=State, default=State.CHECKING)
    detail = models.CharField(max_length=300, blank=True)
    chunks_checked = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"check of {self.model_id}: {self.state}"
