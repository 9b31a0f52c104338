"""The REST API: thin DRF views, each calling one service or one read."""

from __future__ import annotations

import re

from django.db.models import Count
from django.http import FileResponse
from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_serializer,
    inline_serializer,
)
from rest_framework import generics, serializers
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.models import Bid, Device, DeviceClass, Task, TaskState
from marketplace.permissions import (
    DeviceSignatureAuthentication,
    IsTaskBuyer,
    IsTaskBuyerOrStaff,
    is_staff,
)
from marketplace.services import (
    device_enrol,
    enrolment_config,
    join_challenge_issue,
    task_create,
    task_model_download,
)
from marketplace.throttles import FlexRateThrottle
from training.errors import SpecError
from training.spec import TaskSpec

_DIGITS = re.compile(r"-?[0-9]{1,80}")
MAX_WEI = 2**256 - 1
# The one error shape (marketplace.errors.api_exception_handler), for the schema.
ERROR_SHAPE = inline_serializer(
    name="Error",
    fields={
        "code": serializers.CharField(),
        "message": serializers.CharField(),
        "fields": serializers.DictField(),
    },
)


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


# ---------------------------------------------------------------- output shapes


class BidOutputSerializer(serializers.ModelSerializer):
    task = serializers.PrimaryKeyRelatedField(read_only=True)
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


class SelectedOutputSerializer(serializers.Serializer):
    device = serializers.CharField()
    role = serializers.CharField()
    position = serializers.IntegerField(allow_null=True)
    price_per_round_wei = WeiField()
    tx_hash = serializers.CharField()


class RoundOutputSerializer(serializers.Serializer):
    number = serializers.IntegerField()
    global_model_id = serializers.CharField()
    updates_aggregated = serializers.IntegerField()
    accuracy = serializers.FloatField(allow_null=True)
    loss = serializers.FloatField(allow_null=True)
    published_at = serializers.DateTimeField(allow_null=True)
    tx_hash = serializers.CharField()


class PayoutOutputSerializer(serializers.Serializer):
    account = serializers.CharField()
    reason = serializers.CharField()
    amount_wei = WeiField()
    tx_hash = serializers.CharField()
    block_number = serializers.IntegerField()


class TaskOutputSerializer(serializers.ModelSerializer):
    buyer = serializers.SlugRelatedField(slug_field="username", read_only=True)
    budget_wei = WeiField()

    class Meta:
        model = Task
        fields = [
            "id",
            "chain_task_id",
            "title",
            "buyer",
            "state",
            "budget_wei",
            "rounds",
            "published_rounds",
            "min_trainers",
            "max_trainers",
            "bidding_ends",
            "created_at",
        ]


class TaskDetailOutputSerializer(TaskOutputSerializer):
    aggregator_price_wei = WeiField(allow_null=True)
    trainers_paid_wei = WeiField(allow_null=True)
    aggregator_paid_wei = WeiField(allow_null=True)
    refunded_wei = WeiField(allow_null=True)
    bids = BidOutputSerializer(many=True)
    selected = SelectedOutputSerializer(many=True)
    rounds_published = RoundOutputSerializer(many=True, source="round_set")
    payouts = PayoutOutputSerializer(many=True)

    class Meta(TaskOutputSerializer.Meta):
        fields = [
            *TaskOutputSerializer.Meta.fields,
            "buyer_address",
            "spec",
            "spec_hash",
            "round_timeout_s",
            "aggregator",
            "aggregator_price_wei",
            "trainers_paid_wei",
            "aggregator_paid_wei",
            "refunded_wei",
            "failure_reason",
            "created_tx",
            "created_block",
            "updated_at",
            "bids",
            "selected",
            "rounds_published",
            "payouts",
        ]


class OpenTaskOutputSerializer(serializers.ModelSerializer):
    """What a device needs to decide a bid; nothing about the buyer beyond the chain's."""

    budget_wei = WeiField()
    bid_count = serializers.IntegerField()

    class Meta:
        model = Task
        fields = [
            "chain_task_id",
            "title",
            "spec",
            "spec_hash",
            "budget_wei",
            "rounds",
            "min_trainers",
            "max_trainers",
            "bidding_ends",
            "round_timeout_s",
            "bid_count",
        ]


class DevicePublicOutputSerializer(serializers.ModelSerializer):
    """What the chain shows anyway: address, class, aggregation right and status."""

    class Meta:
        model = Device
        fields = ["id", "address", "device_class", "may_aggregate", "chain_status"]


class DeviceStaffOutputSerializer(serializers.ModelSerializer):
    join_token = serializers.SlugRelatedField(slug_field="label", read_only=True)

    class Meta:
        model = Device
        fields = [
            *DevicePublicOutputSerializer.Meta.fields,
            "name",
            "dataplane_url",
            "join_token",
            "enrolled_at",
            "revoked_at",
            "registration_tx",
        ]


# ---------------------------------------------------------------- reads


class ApiAuthMixin:
    """Token first, so that an unauthenticated call gets 401 with ``WWW-Authenticate: Token``
    (session first would answer 403); the session serves the browsable API and the site."""

    authentication_classes = [TokenAuthentication, SessionAuthentication]
    permission_classes = [IsAuthenticated]


def _tasks_visible(request):
    """A buyer sees their own tasks; staff see every task."""
    tasks = Task.objects.select_related("buyer")
    return tasks if is_staff(request) else tasks.filter(buyer_id=request.user.pk)


@extend_schema(
    tags=["tasks"],
    description="Your own tasks, newest first (staff: every task).",
    parameters=[OpenApiParameter("state", enum=TaskState.values, required=False)],
)
class TaskListApi(ApiAuthMixin, generics.ListAPIView):
    serializer_class = TaskOutputSerializer

    def get_queryset(self):
        # The spec is the widest column and the list does not show it.
        tasks = _tasks_visible(self.request).defer("spec")
        state = self.request.query_params.get("state")
        if state is None:
            return tasks
        if state not in TaskState.values:
            raise serializers.ValidationError({"state": [f"Must be one of {TaskState.values}."]})
        return tasks.filter(state=state)


@extend_schema(
    tags=["tasks"],
    description="A task with its bids, selected nodes, rounds and payouts: its buyer and staff.",
    responses={200: TaskDetailOutputSerializer, 403: ERROR_SHAPE, 404: ERROR_SHAPE},
)
class TaskDetailApi(ApiAuthMixin, generics.RetrieveAPIView):
    serializer_class = TaskDetailOutputSerializer
    permission_classes = [IsAuthenticated, IsTaskBuyerOrStaff]
    queryset = Task.objects.select_related("buyer").prefetch_related(
        "bids", "selected", "round_set", "payouts"
    )


@extend_schema(
    tags=["bids"],
    description="Bids on your own tasks (staff: every bid), optionally of one task.",
    parameters=[OpenApiParameter("task", int, required=False, description="A task's id.")],
)
class BidListApi(ApiAuthMixin, generics.ListAPIView):
    serializer_class = BidOutputSerializer

    def get_queryset(self):
        bids = Bid.objects.all()
        if not is_staff(self.request):
            bids = bids.filter(task__buyer_id=self.request.user.pk)
        task = self.request.query_params.get("task")
        if task is not None:
            if not task.isdigit():
                raise serializers.ValidationError({"task": ["Must be a task's id."]})
            bids = bids.filter(task_id=int(task))
        return bids


@extend_schema(tags=["bids"], responses={200: BidOutputSerializer, 403: ERROR_SHAPE})
class BidDetailApi(ApiAuthMixin, generics.RetrieveAPIView):
    serializer_class = BidOutputSerializer
    permission_classes = [IsAuthenticated, IsTaskBuyerOrStaff]
    queryset = Bid.objects.select_related("task")


class _DeviceSerializerMixin:
    def get_serializer_class(self):
        if is_staff(self.request):
            return DeviceStaffOutputSerializer
        return DevicePublicOutputSerializer


@extend_schema(
    tags=["devices"],
    description="Enrolled devices. Staff see every field; others only what the chain shows.",
    responses=DeviceStaffOutputSerializer,
)
class DeviceListApi(ApiAuthMixin, _DeviceSerializerMixin, generics.ListAPIView):
    queryset = Device.objects.select_related("join_token")


@extend_schema(tags=["devices"], responses=DeviceStaffOutputSerializer)
class DeviceDetailApi(ApiAuthMixin, _DeviceSerializerMixin, generics.RetrieveAPIView):
    queryset = Device.objects.select_related("join_token")


@extend_schema(
    tags=["devices"],
    description=(
        "Tasks open for bids now, soonest deadline first. For enrolled devices, which sign the "
        "request with their key (deviceSignature), and for any signed-in user."
    ),
)
class OpenTaskListApi(generics.ListAPIView):
    serializer_class = OpenTaskOutputSerializer
    authentication_classes = [DeviceSignatureAuthentication, *ApiAuthMixin.authentication_classes]

    def get_queryset(self):
        return (
            # A pending task's creation is mined already (task_create waits for the receipt):
            # devices may bid on it before chain sync has confirmed the row.
            Task.objects.filter(
                state__in=[TaskState.PENDING, TaskState.BIDDING],
                bidding_ends__gt=timezone.now(),
                chain_task_id__isnull=False,
            )
            .annotate(bid_count=Count("bids"))
            .order_by("bidding_ends", "chain_task_id")
        )


# ---------------------------------------------------------------- writes


@extend_schema(tags=["tasks"])
class TaskCreateApi(ApiAuthMixin, APIView):
    """Post a task on chain from your wallet, with its budget in escrow."""

    @extend_schema_serializer(component_name="TaskCreateInput")
    class InputSerializer(serializers.Serializer):
        title = serializers.CharField(max_length=120, required=False, allow_blank=True, default="")
        spec = serializers.JSONField(help_text="The task spec (training.spec.TaskSpec) as JSON.")
        budget_wei = WeiField(min_value=1)
        min_trainers = serializers.IntegerField(min_value=1)
        max_trainers = serializers.IntegerField(min_value=1)
        bidding_ends = serializers.DateTimeField(required=False, help_text="Give this...")
        bidding_window_s = serializers.IntegerField(
            min_value=1, required=False, help_text="...or this: seconds of bidding from now."
        )
        round_timeout_s = serializers.IntegerField(min_value=1)

        def validate_spec(self, value) -> TaskSpec:
            try:
                return TaskSpec.from_dict(value)
            except SpecError as exc:
                raise serializers.ValidationError(exc.message, code=exc.code) from exc

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

    @extend_schema(
        operation_id="tasks_create",
        request=InputSerializer,
        responses={201: TaskDetailOutputSerializer, 400: ERROR_SHAPE, 409: ERROR_SHAPE},
    )
    def post(self, request):
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        task = task_create(buyer=request.user, **data.validated_data)
        task = TaskDetailApi.queryset.get(pk=task.pk)
        return Response(TaskDetailOutputSerializer(task).data, status=201)


@extend_schema(
    tags=["tasks"],
    description=(
        "The task's final global model, fetched from its aggregator's store with the buyer's "
        "key and checked against the model ID on chain: the task's buyer only."
    ),
    responses={
        (200, "application/octet-stream"): OpenApiTypes.BINARY,
        403: ERROR_SHAPE,
        404: ERROR_SHAPE,
        409: ERROR_SHAPE,
        502: ERROR_SHAPE,
    },
)
class TaskModelDownloadApi(ApiAuthMixin, APIView):
    permission_classes = [IsAuthenticated, IsTaskBuyer]

    def get(self, request, pk: int):
        task = get_object_or_404(Task, pk=pk)
        self.check_object_permissions(request, task)
        model = task_model_download(task=task, user=request.user)
        return FileResponse(
            model.file,
            as_attachment=True,
            filename=model.filename,
            content_type="application/octet-stream",
            headers={"X-Flex-Model-Id": model.model_id, "X-Flex-Round": str(model.round_number)},
        )


@extend_schema(
    tags=["auth"],
    request=inline_serializer(
        name="TokenRequest",
        fields={"username": serializers.CharField(), "password": serializers.CharField()},
    ),
    responses={
        200: inline_serializer(name="Token", fields={"token": serializers.CharField()}),
        400: ERROR_SHAPE,
    },
)
class AuthTokenObtainApi(ObtainAuthToken):
    """Trade a username and password for the account's API token (send it as
    ``Authorization: Token <token>``)."""

    # No session authentication here, so a browser's session cannot make it demand CSRF.
    authentication_classes: list = []
    throttle_classes = [FlexRateThrottle]
    throttle_scope = "token"


# ---------------------------------------------------------------- enrolment


class JoinChallengeApi(APIView):
    """Step 1 of enrolment: trade a valid join token for a challenge to sign."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema_serializer(component_name="JoinChallengeInput")
    class InputSerializer(serializers.Serializer):
        token = serializers.CharField(max_length=200)

    @extend_schema(
        tags=["enrolment"],
        request=InputSerializer,
        responses={
            200: inline_serializer(
                name="JoinChallenge",
                fields={
                    "challenge": serializers.CharField(),
                    "expires_at": serializers.DateTimeField(),
                },
            ),
            403: ERROR_SHAPE,
        },
    )
    def post(self, request):
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        token = join_challenge_issue(raw_token=data.validated_data["token"])
        return Response(
            {"challenge": token.challenge, "expires_at": token.challenge_expires_at.isoformat()}
        )


class JoinCompleteApi(APIView):
    """Step 2 of enrolment: the signed challenge registers the device's address on chain."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema_serializer(component_name="JoinCompleteInput")
    class InputSerializer(serializers.Serializer):
        token = serializers.CharField(max_length=200)
        address = serializers.CharField(max_length=42)
        signature = serializers.CharField(max_length=200)
        name = serializers.CharField(max_length=100)
        device_class = serializers.ChoiceField(choices=DeviceClass.choices)
        # Checked by the service, which names what is wrong (dataplane_url_invalid).
        dataplane_url = serializers.CharField(
            required=False, allow_blank=True, default="", max_length=300
        )
        dataplane_cert_sha256 = serializers.CharField(
            required=False, allow_blank=True, default="", max_length=100
        )

    @extend_schema(
        tags=["enrolment"],
        request=InputSerializer,
        responses={
            201: OpenApiResponse(OpenApiTypes.OBJECT, description="The device's configuration."),
            403: ERROR_SHAPE,
            409: ERROR_SHAPE,
        },
    )
    def post(self, request):
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        device = device_enrol(
            raw_token=v["token"],
            address=v["address"],
            signature=v["signature"],
            name=v["name"],
            device_class=v["device_class"],
            dataplane_url=v["dataplane_url"],
            dataplane_cert_sha256=v["dataplane_cert_sha256"],
        )
        return Response(enrolment_config(device=device), status=201)
