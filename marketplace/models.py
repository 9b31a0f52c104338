"""The marketplace's records: enrolment, wallets, the mirror of the FlexMarket contract, and
what the website and the nodes record beside it.

Mirror rows (Task, Bid, SelectedNode, Round, Update, Payout, ChainEventRecord, and a Device's
chain status) are written only by chain sync (marketplace/sync/) from contract events; each
records the transaction and block it was seen in. What the website or a node records before
or beside the chain has rows of its own, linked to the mirror by chain keys: the buyer's
TaskOrder (by its creating transaction), a node's RoundReport and UpdateReport (by the row
they report on). The chain is never written from any of them.
"""

from __future__ import annotations

import functools
import hashlib

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone


def token_digest(raw: str) -> str:
    """Only a token's SHA-256 is stored, so a database leak does not leak usable tokens."""
    return hashlib.sha256(raw.encode()).hexdigest()


class WeiField(models.DecimalField):
    """An amount of wei: an exact integer up to 2**256 in the database, ``int`` in Python.

    PostgreSQL keeps it as numeric(78, 0). SQLite has no such type: a column it calls numeric
    turns integers above 2**63 into floats, so there the field is text holding the decimal
    digits (a comparison with a number literal is then a text comparison, which orders
    non-negative amounts without leading zeros correctly against 0, all the checks need).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("max_digits", 78)
        kwargs.setdefault("decimal_places", 0)
        super().__init__(*args, **kwargs)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        kwargs.pop("max_digits", None)
        kwargs.pop("decimal_places", None)
        return name, path, args, kwargs

    def get_internal_type(self):
        # Not "DecimalField": SQLite's backend would convert what it reads through a float.
        # The column type and the values sent are this field's own (db_type, get_db_prep_value).
        return "TextField"

    def db_type(self, connection):
        if connection.vendor == "sqlite":
            return "text"
        return f"numeric({self.max_digits}, {self.decimal_places})"

    def get_db_prep_value(self, value, connection, prepared=False):
        if connection.vendor == "sqlite":
            value = self.to_python(value)
            return None if value is None else str(value)
        return super().get_db_prep_value(value, connection, prepared)

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
    # The prices it declared at enrolment, for cost estimates until it bids (its bids then).
    price_per_round_wei = WeiField(null=True, blank=True)
    aggregator_price_per_round_wei = WeiField(null=True, blank=True)
    join_token = models.OneToOneField(
        JoinToken, null=True, blank=True, on_delete=models.SET_NULL, related_name="device"
    )
    enrolled_at = models.DateTimeField(default=timezone.now)
    # Mirrored by chain sync from the device's latest DeviceRegistered / DeviceRevoked.
    chain_status = models.CharField(
        max_length=10,
        choices=[("none", "Not registered"), ("active", "Active"), ("revoked", "Revoked")],
        default="none",
        editable=False,
    )
    registration_tx = models.CharField(
        max_length=66, blank=True, editable=False, help_text="Its latest DeviceRegistered."
    )

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.address})"

    def get_absolute_url(self) -> str:
        """Its page on the website (staff and its owner): the admin's "View on site"."""
        return reverse("device-page", args=[self.address])

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
    PENDING = "pending", "Pending"  # an order sent by the website, its task not mirrored yet
    BIDDING = "bidding", "Bidding"
    RUNNING = "running", "Running"
    TRAINED = "trained", "Trained"
    FINALIZED = "finalized", "Finalized"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"
    ABORTED = "aborted", "Aborted"


# The states of a task the contract has settled: its pay, stakes and refund are credited.
SETTLED_STATES = (TaskState.FINALIZED, TaskState.ABORTED)


class TaskOrder(models.Model):
    """A task as its buyer ordered it on the website: who, what it is called, its spec and the
    terms asked, and the transaction that created it on chain.

    The chain's side is the Task that the same transaction created (``Task.created_tx``),
    mirrored by chain sync whenever it sees TaskCreated, before or after this row is written;
    a re-org that re-mines the transaction gives the same link. ``chain_task_id`` is the id
    the receipt named, shown while the task is not mirrored yet.
    """

    buyer = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="orders"
    )
    title = models.CharField(max_length=120, blank=True)
    spec = models.JSONField(help_text="The task spec; its canonical hash is on chain.")
    spec_hash = models.CharField(max_length=66)
    buyer_address = models.CharField(max_length=42, help_text="The wallet that paid.")
    budget_wei = WeiField()
    min_trainers = models.PositiveIntegerField()
    max_trainers = models.PositiveIntegerField()
    bidding_ends = models.DateTimeField()
    round_timeout_s = models.PositiveIntegerField()
    # Null on orders made before they were kept here; the mirrored task has them too.
    dispute_window_s = models.PositiveIntegerField(null=True)
    sample_cap = models.PositiveBigIntegerField(null=True)
    created_tx = models.CharField(max_length=66, unique=True)
    chain_task_id = models.PositiveBigIntegerField(db_index=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(budget_wei__gt=0), name="task_order_budget_positive"
            ),
        ]

    def __str__(self) -> str:
        return self.title or f"Order {self.pk} (task {self.chain_task_id})"

    @property
    def rounds(self) -> int:
        return int(self.spec.get("rounds", 0))


class Task(models.Model):
    """A training task as the chain has it, mirrored from its events.

    ``buyer`` is the website account whose wallet posted it (None for other accounts); its
    title and spec are on the buyer's TaskOrder, found by ``created_tx`` (see ``order``).
    """

    chain_task_id = models.PositiveBigIntegerField(unique=True)
    buyer = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="tasks",
    )
    buyer_address = models.CharField(max_length=42)
    spec_hash = models.CharField(max_length=66, db_index=True)
    state = models.CharField(max_length=10, choices=TaskState.choices, default=TaskState.BIDDING)
    budget_wei = WeiField()
    rounds = models.PositiveIntegerField()
    min_trainers = models.PositiveIntegerField()
    max_trainers = models.PositiveIntegerField()
    bidding_ends = models.DateTimeField()
    round_timeout_s = models.PositiveIntegerField()
    sample_cap = models.PositiveBigIntegerField(default=1000)
    aggregator = models.CharField(max_length=42, blank=True)
    aggregator_price_wei = WeiField(null=True, blank=True)
    # The block time of NodesSelected: the initial model is due a round timeout after it.
    selected_at = models.DateTimeField(null=True, blank=True)
    published_rounds = models.PositiveIntegerField(default=0)
    trainers_paid_wei = WeiField(null=True, blank=True)
    aggregator_paid_wei = WeiField(null=True, blank=True)
    refunded_wei = WeiField(null=True, blank=True)
    slashed_wei = WeiField(null=True, blank=True)
    failure_reason = models.CharField(max_length=40, blank=True)
    # Seconds after each global model in which anyone may prove it wrong (DisputeTermsSet).
    dispute_window_s = models.PositiveIntegerField(default=0)
    # The global model a challenge proved wrong, who proved it and its bounty
    # (AggregateChallenged); the task is then aborted and its aggregator's bond slashed.
    challenged_round = models.PositiveIntegerField(null=True, blank=True)
    challenged_by = models.CharField(max_length=42, blank=True)
    challenge_bounty_wei = WeiField(null=True, blank=True)
    challenge_tx = models.CharField(max_length=66, blank=True)
    created_tx = models.CharField(max_length=66, db_index=True)
    created_block = models.PositiveBigIntegerField()
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
        indexes = [
            # A buyer's task list, a page at a time by chain id (either way), all or by state.
            models.Index(fields=["buyer", "chain_task_id"], name="task_buyer_by_id"),
            models.Index(fields=["buyer", "state", "chain_task_id"], name="task_buyer_state_by_id"),
            # The tasks open for bids, soonest deadline first (devices poll it).
            models.Index(
                fields=["bidding_ends", "chain_task_id"],
                condition=Q(state="bidding"),
                name="task_open_by_deadline",
            ),
        ]

    def __str__(self) -> str:
        return f"Task {self.chain_task_id}"

    def get_absolute_url(self) -> str:
        """Its page on the website (its buyer and staff): the admin's "View on site"."""
        return reverse("task-detail", args=[self.chain_task_id])

    @functools.cached_property
    def order(self) -> TaskOrder | None:
        """The buyer's order that created this task, if it came from the website."""
        return TaskOrder.objects.filter(created_tx=self.created_tx).first()


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
    deposit_wei = WeiField(default=0)

    class Meta:
        ordering = ["task", "bid_index"]
        constraints = [
            models.UniqueConstraint(fields=["task", "device"], name="bid_one_per_device")
        ]
        # A device's page and status read its bids across every task.
        indexes = [models.Index(fields=["device"], name="bid_by_device")]

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
        indexes = [models.Index(fields=["device"], name="selected_by_device")]

    def __str__(self) -> str:
        return f"{self.role} {self.device} of {self.task}"


class Round(ChainRecord):
    """Global model ``number`` of a task (what its aggregator measured is its RoundReport)."""

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="round_set")
    number = models.PositiveIntegerField()
    global_model_id = models.CharField(max_length=66)
    aggregated_mask = models.CharField(max_length=80, default="0", help_text="Decimal bitmask.")
    updates_aggregated = models.PositiveIntegerField(default=0)
    # Of the previous round's aggregated updates, one per set bit of the mask, in position
    # order; empty when that round was unscored (every aggregated trainer paid its price).
    scores = models.JSONField(default=list, blank=True)
    published_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["task", "number"]
        constraints = [
            models.UniqueConstraint(fields=["task", "number"], name="round_unique_number")
        ]

    def __str__(self) -> str:
        return f"{self.task} round {self.number}"

    @property
    def metrics(self) -> RoundReport | None:
        """The aggregator's report on this round's global model, if it has one."""
        return _report_on(self, self.global_model_id)


class ExclusionReason(models.TextChoices):
    """Why the next global model left an update out, as its aggregator stated on chain
    (chain.events.Reason by name; docs/verifiable.md, "Exclusions")."""

    NOT_FETCHABLE = "not_fetchable", "not fetchable"
    WRONG_KIND = "wrong_kind", "not an update"
    WRONG_TASK = "wrong_task", "made for another task"
    WRONG_ROUND = "wrong_round", "made in another round"
    WRONG_AUTHOR = "wrong_author", "names another trainer"
    WRONG_LAYOUT = "wrong_layout", "wrong layout"
    SAMPLES_OUT_OF_RANGE = "samples_out_of_range", "sample count out of range"
    COPIED = "copied", "copies an earlier model"
    UNSTATED = "unstated", "no reason stated"


class Update(ChainRecord):
    """A trainer's update ID for a round (the weights stay on the device), and why the next
    global model left it out when it did (blank: no reason stated, or not left out)."""

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="updates")
    round_number = models.PositiveIntegerField()
    trainer = models.CharField(max_length=42)
    position = models.PositiveIntegerField()
    model_id = models.CharField(max_length=66)
    exclusion_reason = models.CharField(max_length=24, blank=True, choices=ExclusionReason)
    exclusion_evidence = models.CharField(max_length=66, blank=True)  # the model it copies

    class Meta:
        ordering = ["task", "round_number", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["task", "round_number", "trainer"], name="update_once_per_round"
            )
        ]
        indexes = [models.Index(fields=["trainer"], name="update_by_trainer")]

    def __str__(self) -> str:
        return f"update of {self.trainer} in {self.task} round {self.round_number}"

    @property
    def metrics(self) -> UpdateReport | None:
        """The trainer's report on this update, if it has one."""
        return _report_on(self, self.model_id)


def _report_on(row: models.Model, model_id: str):
    """``row.report`` when it reports on ``model_id``, else None."""
    try:
        report = row.report
    except models.ObjectDoesNotExist:
        return None
    return report if report.model_id.lower() == model_id.lower() else None


class PayoutReason(models.TextChoices):
    TRAINER_PAY = "trainer", "Trainer pay"
    AGGREGATOR_PAY = "aggregator", "Aggregator pay"
    REFUND = "refund", "Refund"
    STAKE_RETURNED = "stake", "Stake returned"
    STAKE_SLASHED = "slash", "Slashed stake"
    CHALLENGE_BOUNTY = "bounty", "Challenge bounty"


# Pay for work, as against a deposit coming back (or slashed) and the buyer's refund.
PAY_REASONS = (PayoutReason.TRAINER_PAY, PayoutReason.AGGREGATOR_PAY)


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


# Rows the platform writes itself live beside the mirror, in their own module; imported here
# so that Django (and every caller) finds all of the app's models in marketplace.models.
from marketplace.models_platform import (  # noqa: E402, F401
    LifecycleAction,
    ModelCheck,
    RoundReport,
    UpdateReport,
    ValidationSet,
)
