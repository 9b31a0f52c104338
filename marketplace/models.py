"""The marketplace's records: enrolment, wallets, and the mirror of the FlexMarket contract.

Mirror rows are written only by chain sync (marketplace/sync.py) from contract events; each
records the transaction and block it was seen in. The chain is never written from them.
"""

from __future__ import annotations

import hashlib

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


def token_digest(raw: str) -> str:
    """Only a token's SHA-256 is stored, so a database leak does not leak usable tokens."""
    return hashlib.sha256(raw.encode()).hexdigest()


class WeiField(models.DecimalField):
    """An amount of wei: an exact integer up to 2**256 in the database, ``int`` in Python."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("max_digits", 78)
        kwargs.setdefault("decimal_places", 0)
        super().__init__(*args, **kwargs)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        kwargs.pop("max_digits", None)
        kwargs.pop("decimal_places", None)
        return name, path, args, kwargs

    def from_db_value(self, value, expression, connection):
        return None if value is None else int(value)

    def to_python(self, value):
        value = super().to_python(value)
        return None if value is None else int(value)


class ChainRecord(models.Model):
    """Where on chain a mirror row was (last) seen."""

    tx_hash = models.CharField(max_length=66)
    block_number = models.PositiveBigIntegerField()

    class Meta:
        abstract = True


class DeviceClass(models.TextChoices):
    CPU = "cpu", "CPU"
    GPU = "gpu", "GPU"
    JETSON = "jetson", "Jetson"


class JoinToken(models.Model):
    """A single-use, expiring invitation for one device to enrol."""

    label = models.CharField(max_length=100, help_text="Who or what the token is for.")
    digest = models.CharField(max_length=64, unique=True, editable=False)
    may_aggregate = models.BooleanField(
        default=False, help_text="The device may bid as an aggregator."
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)
    challenge = models.CharField(max_length=66, blank=True, editable=False)
    challenge_expires_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(expires_at__gt=models.F("created_at")),
                name="join_token_expires_after_creation",
            )
        ]

    def __str__(self) -> str:
        return f"{self.label} ({self.status})"

    @property
    def status(self) -> str:
        if self.used_at:
            return "used"
        if self.revoked_at:
            return "revoked"
        if self.expires_at <= timezone.now():
            return "expired"
        return "valid"


class Device(models.Model):
    """An enrolled device: its chain address, its class and where its work is queued."""

    name = models.CharField(max_length=100)
    address = models.CharField(max_length=42, unique=True)
    device_class = models.CharField(max_length=10, choices=DeviceClass.choices)
    may_aggregate = models.BooleanField(default=False)
    # Where peers fetch the device's blobs, and the SHA-256 of the TLS certificate they pin.
    dataplane_url = models.URLField(blank=True)
    dataplane_cert_sha256 = models.CharField(max_length=64, blank=True)
    join_token = models.OneToOneField(
        JoinToken, null=True, blank=True, on_delete=models.SET_NULL, related_name="device"
    )
    enrolled_at = models.DateTimeField(default=timezone.now)
    registration_tx = models.CharField(max_length=66, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # Mirrored from DeviceRegistered / DeviceRevoked by chain sync.
    chain_status = models.CharField(
        max_length=10,
        choices=[("none", "Not registered"), ("active", "Active"), ("revoked", "Revoked")],
        default="none",
    )

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.address})"

    @property
    def queue(self) -> str:
        from core.queues import device_queue

        return device_queue(self.id)


class Wallet(models.Model):
    """A buyer's custodial Ethereum account; the private key is kept encrypted at rest."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="wallet"
    )
    address = models.CharField(max_length=42, unique=True)
    encrypted_key = models.TextField(editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    def __str__(self) -> str:
        return f"{self.user} ({self.address})"


class ChainCursor(models.Model):
    """How far chain sync has mirrored the contract's events."""

    contract_address = models.CharField(max_length=42, unique=True)
    chain_id = models.PositiveBigIntegerField()
    deploy_block = models.PositiveBigIntegerField(default=0)
    block_number = models.PositiveBigIntegerField(help_text="Last block mirrored.")
    block_hash = models.CharField(max_length=66, blank=True)
    head_block = models.PositiveBigIntegerField(default=0, help_text="Chain head at last sync.")
    synced_at = models.DateTimeField(null=True, blank=True)
    last_lag_ms = models.FloatField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.contract_address} @ {self.block_number}"


class ChainEventRecord(ChainRecord):
    """Every contract event, as decoded: the trace of every trade and model hand-over."""

    log_index = models.PositiveIntegerField()
    block_hash = models.CharField(max_length=66)
    name = models.CharField(max_length=40, db_index=True)
    task_id = models.PositiveBigIntegerField(null=True, blank=True, db_index=True)
    args = models.JSONField(default=dict)
    seen_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["block_number", "log_index"]
        constraints = [
            models.UniqueConstraint(fields=["tx_hash", "log_index"], name="event_unique_log")
        ]
        # Sync looks records up by block: re-org checks and the start-up rewind.
        indexes = [models.Index(fields=["block_number", "log_index"], name="event_block_order")]

    def __str__(self) -> str:
        return f"{self.name} @ {self.block_number}:{self.log_index}"


class TaskState(models.TextChoices):
    PENDING = "pending", "Pending"  # sent by the website, not yet seen on chain
    BIDDING = "bidding", "Bidding"
    RUNNING = "running", "Running"
    TRAINED = "trained", "Trained"
    FINALIZED = "finalized", "Finalized"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"
    ABORTED = "aborted", "Aborted"


class Task(models.Model):
    """A training task: its off-chain spec, and its on-chain state as mirrored."""

    chain_task_id = models.PositiveBigIntegerField(unique=True, null=True, blank=True)
    buyer = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="tasks",
    )
    title = models.CharField(max_length=120, blank=True)
    buyer_address = models.CharField(max_length=42)
    spec = models.JSONField(help_text="The task spec; its canonical hash is on chain.")
    spec_hash = models.CharField(max_length=66, db_index=True)
    state = models.CharField(max_length=10, choices=TaskState.choices, default=TaskState.PENDING)
    budget_wei = WeiField()
    rounds = models.PositiveIntegerField()
    min_trainers = models.PositiveIntegerField()
    max_trainers = models.PositiveIntegerField()
    bidding_ends = models.DateTimeField()
    round_timeout_s = models.PositiveIntegerField()
    aggregator = models.CharField(max_length=42, blank=True)
    aggregator_price_wei = WeiField(null=True, blank=True)
    published_rounds = models.PositiveIntegerField(default=0)
    trainers_paid_wei = WeiField(null=True, blank=True)
    aggregator_paid_wei = WeiField(null=True, blank=True)
    refunded_wei = WeiField(null=True, blank=True)
    failure_reason = models.CharField(max_length=40, blank=True)
    created_tx = models.CharField(max_length=66, blank=True)
    created_block = models.PositiveBigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(min_trainers__gte=1) & Q(max_trainers__gte=models.F("min_trainers")),
                name="task_trainer_range_valid",
            ),
            models.CheckConstraint(condition=Q(rounds__gte=1), name="task_rounds_positive"),
            models.CheckConstraint(condition=Q(budget_wei__gt=0), name="task_budget_positive"),
        ]

    def __str__(self) -> str:
        return self.title or f"Task {self.chain_task_id or self.pk}"


class Role(models.TextChoices):
    TRAINER = "trainer", "Trainer"
    AGGREGATOR = "aggregator", "Aggregator"


class Bid(ChainRecord):
    """A device's current bid on a task (a new bid from the same device replaces it)."""

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="bids")
    device = models.CharField(max_length=42)
    bid_index = models.PositiveIntegerField()
    role = models.CharField(max_length=10, choices=Role.choices)
    price_per_round_wei = WeiField()
    samples = models.PositiveBigIntegerField()

    class Meta:
        ordering = ["task", "bid_index"]
        constraints = [
            models.UniqueConstraint(fields=["task", "device"], name="bid_one_per_device")
        ]

    def __str__(self) -> str:
        return f"{self.role} bid by {self.device} on {self.task}"


class SelectedNode(ChainRecord):
    """A device the contract selected for a task: the aggregator, or trainer ``position``."""

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="selected")
    device = models.CharField(max_length=42)
    role = models.CharField(max_length=10, choices=Role.choices)
    position = models.PositiveIntegerField(null=True, blank=True, help_text="Trainers only.")
    price_per_round_wei = WeiField()

    class Meta:
        ordering = ["task", "role", "position"]
        constraints = [
            models.UniqueConstraint(fields=["task", "device"], name="selected_once_per_task")
        ]

    def __str__(self) -> str:
        return f"{self.role} {self.device} of {self.task}"


class Round(ChainRecord):
    """Global model ``number`` of a task, and the metrics its aggregator reported for it."""

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="round_set")
    number = models.PositiveIntegerField()
    global_model_id = models.CharField(max_length=66)
    aggregated_mask = models.CharField(max_length=80, default="0", help_text="Decimal bitmask.")
    updates_aggregated = models.PositiveIntegerField(default=0)
    accuracy = models.FloatField(null=True, blank=True)
    loss = models.FloatField(null=True, blank=True)
    gas_used = models.PositiveBigIntegerField(null=True, blank=True)
    published_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["task", "number"]
        constraints = [
            models.UniqueConstraint(fields=["task", "number"], name="round_unique_number")
        ]

    def __str__(self) -> str:
        return f"{self.task} round {self.number}"


class Update(ChainRecord):
    """A trainer's update ID for a round (the weights stay on the device)."""

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="updates")
    round_number = models.PositiveIntegerField()
    trainer = models.CharField(max_length=42)
    position = models.PositiveIntegerField()
    model_id = models.CharField(max_length=66)
    # Reported by the trainer itself, on its own data (not checked by anyone).
    num_examples = models.PositiveIntegerField(null=True, blank=True)
    local_loss = models.FloatField(null=True, blank=True)
    local_accuracy = models.FloatField(null=True, blank=True)
    train_s = models.FloatField(null=True, blank=True, help_text="Local training time.")

    class Meta:
        ordering = ["task", "round_number", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["task", "round_number", "trainer"], name="update_once_per_round"
            )
        ]

    def __str__(self) -> str:
        return f"update of {self.trainer} in {self.task} round {self.round_number}"


class PayoutReason(models.TextChoices):
    TRAINER_PAY = "trainer", "Trainer pay"
    AGGREGATOR_PAY = "aggregator", "Aggregator pay"
    REFUND = "refund", "Refund"


class Payout(ChainRecord):
    """A credit the contract made to an account (withdrawn by its owner, pull payment)."""

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="payouts")
    log_index = models.PositiveIntegerField()
    account = models.CharField(max_length=42, db_index=True)
    amount_wei = WeiField()
    reason = models.CharField(max_length=10, choices=PayoutReason.choices)

    class Meta:
        ordering = ["task", "block_number", "log_index"]
        constraints = [
            models.UniqueConstraint(fields=["tx_hash", "log_index"], name="payout_unique_log"),
            models.CheckConstraint(condition=Q(amount_wei__gt=0), name="payout_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.amount_wei} wei to {self.account} ({self.reason})"


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
