"""The one representation of a task (and of what hangs off it), for the task page, the API and
the live push alike; exact wei amounts as strings of digits."""

from __future__ import annotations

import re

from django.utils import timezone
from drf_spectacular.utils import extend_schema_field, extend_schema_serializer
from rest_framework import serializers

from chain.client import DEFAULT_SAMPLE_CAP
from marketplace.models import Bid, Device, PayoutReason, TaskState
from marketplace.selectors import (
    BIDS_SHOWN,
    CONTRIBUTION_ROUNDS_SHOWN,
    TRANSACTIONS_SHOWN,
    UPDATE_ROUNDS_SHOWN,
)
from marketplace.services import MAX_BIDDING_END
from training.aggregation import STRATEGIES
from training.aggregation.functions import MAX_SAMPLES
from training.catalogue import MODELS, SCHEMAS
from training.errors import SpecError
from training.spec import LIMITS, MAX_LEARNING_RATE, REQUIRED, SPEC_VERSION, TaskSpec

_DIGITS = re.compile(r"-?[0-9]{1,80}")
MAX_WEI = 2**256 - 1


@extend_schema_field(
    {"type": "string", "pattern": "^[0-9]+$", "example": "1000000000000000000"},
    component_name="Wei",
)
class WeiField(serializers.Field):
    """An exact amount of wei: read as an integer or a string of digits, written as a string
    (JSON numbers lose precision above 2**53 in most clients)."""

    default_error_messages = {
        "invalid": "Give wei as a whole number: an integer or a string of digits.",
        "min_value": "Must be at least {min_value} wei.",
        "max_value": "Must be below 2**256 wei.",
    }

    def __init__(self, *, min_value: int = 0, **kwargs) -> None:
        self.min_value = min_value
        super().__init__(**kwargs)

    def to_internal_value(self, data) -> int:
        if isinstance(data, bool) or not isinstance(data, int | str):
            self.fail("invalid")
        if isinstance(data, str):
            if not _DIGITS.fullmatch(data.strip()):
                self.fail("invalid")
            data = int(data.strip())
        if data < self.min_value:
            self.fail("min_value", min_value=self.min_value)
        if data > MAX_WEI:
            self.fail("max_value")
        return data

    def to_representation(self, value: int) -> str:
        return str(value)


# ---------------------------------------------------------------- what hangs off a task


class BidSerializer(serializers.ModelSerializer):
    task = serializers.SlugRelatedField(slug_field="chain_task_id", read_only=True)
    price_per_round_wei = WeiField()

    class Meta:
        model = Bid
        fields = [
            "id",
            "task",
            "bid_index",
            "device",
            "role",
            "price_per_round_wei",
            "samples",
            "tx_hash",
            "block_number",
        ]


class SelectedSerializer(serializers.Serializer):
    device = serializers.CharField()
    role = serializers.CharField()
    position = serializers.IntegerField(allow_null=True, help_text="None for the aggregator.")
    price_per_round_wei = WeiField()
    tx_hash = serializers.CharField()
    block_number = serializers.IntegerField()


class RoundSerializer(serializers.Serializer):
    """A published global model; accuracy, loss and gas_used as its aggregator reported them
    (None until it does)."""

    number = serializers.IntegerField()
    global_model_id = serializers.CharField()
    updates_aggregated = serializers.IntegerField()
    aggregated_mask = serializers.CharField(help_text="Decimal bitmask of trainer positions.")
    scores = serializers.ListField(
        child=serializers.IntegerField(),
        help_text="The previous round's scores, one per aggregated update in position order; "
        "empty when unscored.",
    )
    accuracy = serializers.FloatField(source="metrics.accuracy", allow_null=True)
    loss = serializers.FloatField(source="metrics.loss", allow_null=True)
    gas_used = serializers.IntegerField(source="metrics.gas_used", allow_null=True)
    published_at = serializers.DateTimeField(allow_null=True)
    tx_hash = serializers.CharField()
    block_number = serializers.IntegerField()


class UpdateSerializer(serializers.Serializer):
    """A trainer's update ID; the rest as the trainer reported it on its own data."""

    round = serializers.IntegerField(source="round_number")
    trainer = serializers.CharField()
    position = serializers.IntegerField()
    model_id = serializers.CharField()
    tx_hash = serializers.CharField()
    block_number = serializers.IntegerField()
    num_examples = serializers.IntegerField(source="metrics.num_examples", allow_null=True)
    loss = serializers.FloatField(source="metrics.loss", allow_null=True)
    accuracy = serializers.FloatField(source="metrics.accuracy", allow_null=True)
    train_s = serializers.FloatField(source="metrics.train_s", allow_null=True)
    exclusion_reason = serializers.CharField(
        help_text="Why the next global model left it out, as stated on chain; blank if none."
    )


class TransactionSerializer(serializers.Serializer):
    """A contract event of the task; args as decoded (wei and masks as decimal strings)."""

    name = serializers.CharField()
    tx_hash = serializers.CharField()
    block_number = serializers.IntegerField()
    log_index = serializers.IntegerField()
    args = serializers.DictField()


class RoundScoreSerializer(serializers.Serializer):
    round = serializers.IntegerField(help_text="The round whose update was scored.")
    aggregated = serializers.BooleanField(help_text="False: left out, paid nothing that round.")
    left_out = serializers.CharField(
        allow_null=True,
        help_text="For a submitted update left out, the reason its aggregator stated on chain "
        "(or 'no reason stated'); None when aggregated or nothing was submitted.",
    )
    score = serializers.IntegerField(allow_null=True, help_text="uint16; None when unscored.")
    share_bp = serializers.IntegerField(
        allow_null=True, help_text="The score's share of the round's scores, in basis points."
    )


class ContributionSerializer(serializers.Serializer):
    """A trainer's measured contribution per round and the pay the contract credited it."""

    trainer = serializers.CharField()
    position = serializers.IntegerField()
    price_per_round_wei = WeiField()
    rounds = RoundScoreSerializer(
        many=True,
        help_text=f"The last {CONTRIBUTION_ROUNDS_SHOWN} closed rounds; every round's scores "
        "are in rounds_published.",
    )
    rounds_aggregated = serializers.IntegerField(
        help_text="How many of the task's closed rounds aggregated its update."
    )
    paid_wei = WeiField(allow_null=True, help_text="None before the task is settled.")


class PayoutSerializer(serializers.Serializer):
    account = serializers.CharField()
    reason = serializers.ChoiceField(
        choices=PayoutReason.choices,
        help_text="What it is for: trainer or aggregator pay, the buyer's refund, a stake or "
        "bond returned, slashed or paid as a challenge's bounty.",
    )
    reason_label = serializers.CharField(source="get_reason_display", read_only=True)
    amount_wei = WeiField()
    tx_hash = serializers.CharField()
    block_number = serializers.IntegerField()
    log_index = serializers.IntegerField()


# ---------------------------------------------------------------- the task


class TaskSummarySerializer(serializers.Serializer):
    """A task in a list (selectors.TaskView): ``id`` is its id on chain."""

    id = serializers.IntegerField()
    title = serializers.CharField()
    buyer = serializers.SerializerMethodField(help_text="The buyer's user name.")
    state = serializers.ChoiceField(choices=TaskState.choices)
    budget_wei = WeiField()
    rounds = serializers.IntegerField(help_text="Rounds ordered.")
    published_rounds = serializers.IntegerField(
        help_text="Global models published (round 0 is the initial model)."
    )
    min_trainers = serializers.IntegerField()
    max_trainers = serializers.IntegerField()
    bidding_ends = serializers.DateTimeField()
    created_at = serializers.DateTimeField()

    def get_buyer(self, view) -> str | None:
        return view.buyer.username if view.buyer is not None else None


class TaskSerializer(TaskSummarySerializer):
    """A task: the buyer's order and the chain's mirror of it, with everything that hangs off
    it. State "pending" while sync has not mirrored the order's task."""

    buyer_address = serializers.CharField()
    spec = serializers.JSONField(allow_null=True, help_text="None if posted outside the site.")
    spec_hash = serializers.CharField()
    round_timeout_s = serializers.IntegerField()
    sample_cap = serializers.IntegerField(
        allow_null=True,
        help_text="Most samples a trainer's bid counts for (None only for an order made before "
        "orders kept it, until chain sync mirrors its task).",
    )
    current_round = serializers.IntegerField(
        allow_null=True, help_text="The round trainers work on now, while running."
    )
    aggregator = serializers.CharField(allow_blank=True)
    aggregator_price_wei = WeiField(allow_null=True)
    trainers_paid_wei = WeiField(allow_null=True)
    aggregator_paid_wei = WeiField(allow_null=True)
    refunded_wei = WeiField(allow_null=True)
    refund_wei = WeiField(allow_null=True, help_text="Everything credited back to the buyer.")
    failure_reason = serializers.CharField(allow_blank=True)
    dispute_window_s = serializers.IntegerField(
        allow_null=True,
        help_text="Seconds after each global model in which anyone may prove it wrong (0: no "
        "disputes; None as sample_cap).",
    )
    challenged_round = serializers.IntegerField(
        allow_null=True,
        help_text="The global model a challenge proved wrong: the aggregator's bond was "
        "slashed and the task aborted.",
    )
    challenged_by = serializers.CharField(allow_blank=True)
    challenge_bounty_wei = WeiField(allow_null=True)
    created_tx = serializers.CharField()
    created_block = serializers.IntegerField(allow_null=True)
    bids = BidSerializer(
        many=True,
        help_text=f"The latest {BIDS_SHOWN} bids, in bid order; every bid, a page at a time: "
        "/api/bids/?task={id}.",
    )
    bid_count = serializers.IntegerField()
    selected = SelectedSerializer(many=True)
    rounds_published = RoundSerializer(many=True)
    updates = UpdateSerializer(
        many=True,
        help_text=f"The updates of the last {UPDATE_ROUNDS_SHOWN} rounds (the round under way "
        "and the one before it); every update, a page at a time: /api/tasks/{id}/updates/.",
    )
    update_count = serializers.IntegerField(help_text="Updates submitted in every round.")
    transactions = TransactionSerializer(
        many=True,
        help_text=f"The events of the task's latest {TRANSACTIONS_SHOWN} transactions, in chain "
        "order; every event, a page at a time: /api/tasks/{id}/transactions/.",
    )
    transaction_count = serializers.IntegerField(help_text="The task's transactions.")
    payouts = PayoutSerializer(many=True)
    contributions = ContributionSerializer(many=True)


class OpenTaskSerializer(serializers.Serializer):
    """What a device needs to decide a bid; nothing about the buyer beyond the chain's."""

    id = serializers.IntegerField()
    title = serializers.CharField()
    spec = serializers.JSONField(allow_null=True)
    spec_hash = serializers.CharField()
    budget_wei = WeiField()
    rounds = serializers.IntegerField()
    min_trainers = serializers.IntegerField()
    max_trainers = serializers.IntegerField()
    bidding_ends = serializers.DateTimeField()
    round_timeout_s = serializers.IntegerField()
    bid_count = serializers.IntegerField()


class DevicePublicSerializer(serializers.ModelSerializer):
    """What the chain shows anyway: address, class, aggregation right and status."""

    class Meta:
        model = Device
        fields = ["id", "address", "device_class", "may_aggregate", "chain_status"]


class DeviceStaffSerializer(serializers.ModelSerializer):
    join_token = serializers.SlugRelatedField(slug_field="label", read_only=True)

    class Meta:
        model = Device
        fields = [
            *DevicePublicSerializer.Meta.fields,
            "name",
            "dataplane_url",
            "join_token",
            "enrolled_at",
            "registration_tx",
        ]


class DeviceTaskSerializer(serializers.Serializer):
    """A task the device bid on: its bid, whether it was selected, its rounds and its pay."""

    task_id = serializers.IntegerField()
    state = serializers.CharField()
    role = serializers.CharField()
    price_per_round_wei = WeiField()
    samples = serializers.IntegerField()
    selected = serializers.BooleanField()
    position = serializers.IntegerField(allow_null=True)
    rounds = serializers.IntegerField()
    rounds_done = serializers.IntegerField(help_text="Closed rounds it delivered.")
    rounds_missed = serializers.IntegerField(help_text="Closed rounds it did not deliver.")
    paid_wei = WeiField()


class DeviceStatusSerializer(serializers.Serializer):
    """What a device's owner sees of it (marketplace.devices.device_status)."""

    address = serializers.CharField()
    name = serializers.CharField()
    device_class = serializers.CharField()
    may_aggregate = serializers.BooleanField()
    chain_status = serializers.CharField()
    enrolled_at = serializers.DateTimeField()
    dataplane_url = serializers.CharField(allow_blank=True)
    dataplane_problem = serializers.CharField(
        allow_null=True, help_text="None when the platform reaches the data plane."
    )
    bids = serializers.IntegerField()
    selected = serializers.IntegerField()
    rounds_done = serializers.IntegerField()
    rounds_missed = serializers.IntegerField()
    earned_wei = WeiField()
    credit_wei = WeiField(allow_null=True, help_text="None when the chain cannot be read.")
    tasks = DeviceTaskSerializer(many=True)


@extend_schema_field(
    {
        "type": "object",
        "description": "The task spec (training.spec.TaskSpec).",
        "properties": {
            "model": {"type": "string", "enum": sorted(MODELS)},
            "dataset": {"type": "string", "enum": sorted(SCHEMAS)},
            **{
                name: {"type": "integer", "minimum": low, "maximum": high}
                for name, (low, high) in LIMITS.items()
            },
            "learning_rate": {
                "type": "number",
                "minimum": 0,
                "exclusiveMinimum": True,  # OpenAPI 3.0's form
                "maximum": MAX_LEARNING_RATE,
            },
            "aggregation": {
                "oneOf": [
                    {"type": "string", "enum": sorted(STRATEGIES)},
                    {
                        "type": "object",
                        "properties": {"strategy": {"type": "string", "enum": sorted(STRATEGIES)}},
                        "required": ["strategy"],
                    },
                ]
            },
            "version": {"type": "integer", "enum": [SPEC_VERSION]},
        },
        "required": list(REQUIRED),
        "additionalProperties": False,
    }
)
class TaskSpecField(serializers.JSONField):
    """A task spec, checked field by field by TaskSpec; its schema says what it takes."""

    def to_internal_value(self, data) -> TaskSpec:
        try:
            return TaskSpec.from_dict(super().to_internal_value(data))
        except SpecError as exc:
            raise serializers.ValidationError(exc.message, code=exc.code) from exc


@extend_schema_serializer(component_name="TaskCreateInput")
class TaskCreateInputSerializer(serializers.Serializer):
    """What POST /api/tasks/create/ takes: the spec, the market terms and the budget."""

    title = serializers.CharField(max_length=120, required=False, allow_blank=True, default="")
    spec = TaskSpecField()
    budget_wei = WeiField(min_value=1)
    min_trainers = serializers.IntegerField(min_value=1)
    max_trainers = serializers.IntegerField(min_value=1)
    bidding_ends = serializers.DateTimeField(required=False, help_text="Give this...")
    bidding_window_s = serializers.IntegerField(
        min_value=1,
        max_value=MAX_BIDDING_END,
        required=False,
        help_text="...or this: seconds of bidding from now.",
    )
    round_timeout_s = serializers.IntegerField(min_value=1)
    sample_cap = serializers.IntegerField(
        min_value=1,
        max_value=MAX_SAMPLES,
        default=DEFAULT_SAMPLE_CAP,
        help_text="Most samples a trainer's bid counts for, in selection and in FedAvg.",
    )
    dispute_window_s = serializers.IntegerField(
        min_value=0,
        required=False,
        help_text="Seconds after each global model in which anyone may prove it wrong "
        "(default: the round timeout; 0: no disputes).",
    )

    def validate_bidding_ends(self, value):
        if value <= timezone.now():
            raise serializers.ValidationError("Must be in the future.", code="past")
        return value

    def validate(self, attrs):
        if ("bidding_ends" in attrs) == ("bidding_window_s" in attrs):
            raise serializers.ValidationError(
                {"bidding_ends": "Give bidding_ends or bidding_window_s, not both or neither."},
                code="bidding_end",
            )
        if attrs["max_trainers"] < attrs["min_trainers"]:
            raise serializers.ValidationError(
                {"max_trainers": "Must be at least min_trainers."}, code="trainer_range"
            )
        return attrs
