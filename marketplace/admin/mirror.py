"""The admin of the chain mirror (read-only), the buyers' orders and the nodes' reports."""

from __future__ import annotations

import time

from django.conf import settings
from django.contrib import admin
from django.utils.html import format_html

from chain.node import connect
from marketplace import contract
from marketplace.admin.common import ReadOnlyAdminMixin, ReadOnlyInline, wei_column
from marketplace.models import (
    Bid,
    ChainCursor,
    ChainEventRecord,
    LifecycleAction,
    Payout,
    Role,
    Round,
    RoundReport,
    SelectedNode,
    Task,
    TaskOrder,
    TaskState,
    Update,
    UpdateReport,
    ValidationSet,
)
from marketplace.task_page import LATE_AFTER

# The admin asks the node for its head while rendering; a lost node must not hang the page.
LIVE_RPC_TIMEOUT_S = 2


class BidInline(ReadOnlyInline):
    model = Bid
    fields = ["bid_index", "device", "role", "price", "samples", "block_number", "tx_hash"]
    readonly_fields = fields
    price = wei_column("price_per_round_wei", "price per round")


class SelectedNodeInline(ReadOnlyInline):
    model = SelectedNode
    fields = ["role", "position", "device", "price", "block_number"]
    readonly_fields = fields
    price = wei_column("price_per_round_wei", "price per round")


# How a reported figure reads: accuracy as a percentage, loss to four decimals.
_FORMATS = {"accuracy": "{:.1%}", "loss": "{:.4f}"}


def _reported(field: str, description: str):
    """A column with what the node reported for the row (``metrics``), "-" if nothing."""

    @admin.display(description=description)
    def column(self, obj) -> str:
        value = getattr(obj.metrics, field) if obj.metrics is not None else None
        return "-" if value is None else _FORMATS.get(field, "{}").format(value)

    column.__name__ = f"reported_{field}"
    return column


class RoundInline(ReadOnlyInline):
    model = Round
    fields = [
        "number",
        "global_model_id",
        "updates_aggregated",
        "accuracy",
        "loss",
        "published_at",
        "block_number",
    ]
    readonly_fields = fields
    accuracy = _reported("accuracy", "accuracy (reported)")
    loss = _reported("loss", "loss (reported)")


class PayoutInline(ReadOnlyInline):
    model = Payout
    fields = ["reason", "account", "amount", "block_number", "tx_hash"]
    readonly_fields = fields
    amount = wei_column("amount_wei", "amount")


class LifecycleActionInline(ReadOnlyInline):
    model = LifecycleAction
    fields = ["action", "round_number", "tx_hash", "fired_at"]
    readonly_fields = fields
    show_change_link = False
    verbose_name_plural = "lifecycle steps fired by the platform"


@admin.register(Task)
class TaskAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = [
        "chain_task_id",
        "title",
        "buyer",
        "state",
        "budget",
        "rounds_done",
        "current_round",
        "bidding_ends",
        "created_at",
    ]
    list_filter = ["state", "created_at"]
    search_fields = [
        "=chain_task_id",
        "buyer__username",
        "buyer_address",
        "spec_hash",
        "created_tx",
    ]
    list_select_related = ["buyer"]
    date_hierarchy = "created_at"
    inlines = [SelectedNodeInline, BidInline, RoundInline, PayoutInline, LifecycleActionInline]
    budget = wei_column("budget_wei", "budget")
    aggregator_price = wei_column("aggregator_price_wei", "aggregator price per round")
    trainers_paid = wei_column("trainers_paid_wei", "paid to trainers")
    aggregator_paid = wei_column("aggregator_paid_wei", "paid to the aggregator")
    refunded = wei_column("refunded_wei", "refunded")
    fieldsets = [
        (None, {"fields": ["title", "buyer", "buyer_address", "state", "failure_reason"]}),
        ("Chain", {"fields": ["chain_task_id", "created_tx", "created_block", "spec_hash"]}),
        (
            "Terms",
            {
                "fields": [
                    "budget",
                    "rounds",
                    "min_trainers",
                    "max_trainers",
                    "bidding_ends",
                    "round_timeout_s",
                ]
            },
        ),
        (
            "Progress and settlement",
            {
                "fields": [
                    "aggregator",
                    "aggregator_price",
                    "rounds_done",
                    "trainers_paid",
                    "aggregator_paid",
                    "refunded",
                    "created_at",
                    "updated_at",
                ]
            },
        ),
    ]

    @admin.display(description="rounds done", ordering="published_rounds")
    def rounds_done(self, obj: Task) -> str:
        # Round 0's global model is the initial one: it is published, not trained.
        return f"{max(obj.published_rounds - 1, 0)} of {obj.rounds}"

    @admin.display(description="round now")
    def current_round(self, obj: Task) -> str:
        """While it runs: the updates in for the current round, flagged once the round is
        late (the task page's rule: half its timeout gone with updates missing)."""
        if obj.state != TaskState.RUNNING or obj.published_rounds == 0:
            return "-"
        number = obj.published_rounds - 1
        trainers = obj.selected.filter(role=Role.TRAINER).count()
        sent = obj.updates.filter(round_number=number).count()
        text = f"{number + 1}: {sent} of {trainers} updates"
        began = obj.round_set.filter(number=number).values_list("published_at", flat=True).first()
        now = time.time() + contract.chain_clock_offset()
        if sent < trainers and began and now > began.timestamp() + obj.round_timeout_s * LATE_AFTER:
            return format_html('<strong title="past half its timeout">{} · late</strong>', text)
        return text

    @admin.display(description="title (the buyer's order)")
    def title(self, obj: Task) -> str:
        order = obj.order
        return order.title if order is not None else "-"


@admin.register(TaskOrder)
class TaskOrderAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Tasks as buyers ordered them on the website; the chain's side is the Task."""

    list_display = ["title", "buyer", "chain_task_id", "budget", "created_at", "created_tx"]
    search_fields = ["title", "buyer__username", "=chain_task_id", "created_tx"]
    list_select_related = ["buyer"]
    date_hierarchy = "created_at"
    budget = wei_column("budget_wei", "budget")
    fields = [
        "title",
        "buyer",
        "buyer_address",
        "chain_task_id",
        "created_tx",
        "budget",
        "min_trainers",
        "max_trainers",
        "bidding_ends",
        "round_timeout_s",
        "spec_hash",
        "spec",
        "created_at",
    ]


@admin.register(Bid)
class BidAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["task", "bid_index", "device", "role", "price", "samples", "block_number"]
    list_filter = ["role"]
    search_fields = ["device", "tx_hash", "=task__chain_task_id"]
    list_select_related = ["task"]
    price = wei_column("price_per_round_wei", "price per round")


@admin.register(SelectedNode)
class SelectedNodeAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["task", "role", "position", "device", "price", "block_number"]
    list_filter = ["role"]
    search_fields = ["device", "tx_hash", "=task__chain_task_id"]
    list_select_related = ["task"]
    price = wei_column("price_per_round_wei", "price per round")


@admin.register(ValidationSet)
class ValidationSetAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Buyers' validation sets, by the content ID task specs commit to (bytes not shown)."""

    list_display = ["content_id", "dataset", "samples", "created_at"]
    search_fields = ["content_id", "uploaded_by__username"]
    # Who uploaded it: the buyers whose specs may name it.
    fields = ["content_id", "dataset", "samples", "created_at", "uploaded_by"]


@admin.register(Round)
class RoundAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = [
        "task",
        "number",
        "global_model_id",
        "updates_aggregated",
        "accuracy",
        "loss",
        "gas_used",
        "published_at",
    ]
    search_fields = ["global_model_id", "tx_hash", "=task__chain_task_id"]
    list_select_related = ["task", "report"]
    accuracy = _reported("accuracy", "accuracy (reported)")
    loss = _reported("loss", "loss (reported)")
    gas_used = _reported("gas_used", "gas (reported)")


@admin.register(RoundReport)
class RoundReportAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """What aggregators reported for their global models."""

    list_display = ["round", "model_id", "accuracy", "loss", "gas_used", "reported_at"]
    search_fields = ["model_id", "tx_hash", "=round__task__chain_task_id"]
    list_select_related = ["round__task"]


@admin.register(UpdateReport)
class UpdateReportAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """What trainers reported measuring on their own data (checked by nobody)."""

    list_display = ["update", "num_examples", "accuracy", "loss", "train_s", "reported_at"]
    search_fields = ["model_id", "=update__task__chain_task_id", "update__trainer"]
    list_select_related = ["update__task"]


@admin.register(Update)
class UpdateAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["task", "round_number", "position", "trainer", "model_id", "block_number"]
    search_fields = ["trainer", "model_id", "tx_hash", "=task__chain_task_id"]
    list_select_related = ["task"]


@admin.register(Payout)
class PayoutAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["task", "reason", "account", "amount", "block_number", "tx_hash"]
    list_filter = ["reason"]
    search_fields = ["account", "tx_hash", "=task__chain_task_id"]
    list_select_related = ["task"]
    amount = wei_column("amount_wei", "amount")


@admin.register(ChainEventRecord)
class ChainEventRecordAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["name", "block_number", "log_index", "task_id", "tx_hash", "seen_at"]
    list_filter = ["name"]
    search_fields = ["name", "tx_hash", "block_hash", "task_id"]


@admin.register(LifecycleAction)
class LifecycleActionAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["task", "action", "round_number", "tx_hash", "fired_at"]
    list_filter = ["action"]
    search_fields = ["tx_hash", "=task__chain_task_id"]
    list_select_related = ["task"]


@admin.register(ChainCursor)
class ChainCursorAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """The chain-sync status: how far the mirror is behind the chain."""

    # Few, short columns: the page must fit a laptop's screen.
    list_display = ["chain_id", "block_number", "lag_blocks", "lag", "synced_at", "live_head"]
    fields = [
        "contract_address",
        "chain_id",
        "deploy_block",
        "block_number",
        "block_hash",
        "head_block",
        "lag_blocks",
        "lag",
        "synced_at",
        "live_head",
    ]
    readonly_fields = fields

    def changelist_view(self, request, extra_context=None):
        return super().changelist_view(
            request, extra_context={"title": "Chain sync status", **(extra_context or {})}
        )

    @admin.display(description="behind")
    def lag_blocks(self, obj: ChainCursor) -> str:
        behind = max(obj.head_block - obj.block_number, 0)
        return f"{behind} block{'s' if behind != 1 else ''}"

    @admin.display(description="last lag", ordering="last_lag_ms")
    def lag(self, obj: ChainCursor) -> str:
        if obj.last_lag_ms is None:
            return "-"
        ms = obj.last_lag_ms
        return f"{ms:.0f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"

    @admin.display(description="head now")
    def live_head(self, obj: ChainCursor) -> str:
        try:
            head = connect(settings.ETH_RPC_URL, timeout=LIVE_RPC_TIMEOUT_S).eth.block_number
        except Exception as exc:  # any transport failure means the same here: no answer
            return format_html("<span title='{}'>node unreachable</span>", str(exc)[:200])
        return f"{head} ({max(head - obj.block_number, 0)} behind)"
