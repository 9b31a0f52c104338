"""The REST API: thin DRF views, each calling one service or one read."""

from __future__ import annotations

import hashlib

from django.core.cache import cache
from django.http import FileResponse, Http404
from django.utils.cache import get_conditional_response, patch_cache_control
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_serializer,
    inline_serializer,
)
from rest_framework import exceptions, generics, serializers
from rest_framework.authentication import (
    SessionAuthentication,
    TokenAuthentication,
    get_authorization_header,
)
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace import selectors
from marketplace.devices import device_status
from marketplace.models import DeviceClass, TaskState
from marketplace.permissions import DeviceSignatureAuthentication
from marketplace.selectors import TASK_LIST_SORTS, task_view_get
from marketplace.serializers import (
    BidSerializer,
    DevicePublicSerializer,
    DeviceStaffSerializer,
    DeviceStatusSerializer,
    OpenTaskSerializer,
    TaskCreateInputSerializer,
    TaskSerializer,
    TaskSummarySerializer,
    TransactionSerializer,
    UpdateSerializer,
    WeiField,
)
from marketplace.services import (
    device_enrol,
    enrolment_config,
    join_challenge_issue,
    task_cancel,
    task_create,
    task_model_download,
)
from marketplace.sync.push import task_view_numbered
from marketplace.task_lists import LIST_CACHE_S, task_list_cache_key
from marketplace.task_page import task_snapshot, task_snapshot_key
from marketplace.throttles import FlexRateThrottle

# The one error shape (marketplace.errors.api_exception_handler), for the schema.
ERROR_SHAPE = inline_serializer(
    name="Error",
    fields={
        "code": serializers.CharField(),
        "message": serializers.CharField(),
        "fields": serializers.DictField(),
    },
)


# ---------------------------------------------------------------- reads


class TokenOrBearerAuthentication(TokenAuthentication):
    """``Authorization: Token <key>``, or ``Bearer <key>`` as many HTTP clients send it."""

    def authenticate(self, request):
        parts = get_authorization_header(request).split()
        if len(parts) == 2 and parts[0].lower() == b"bearer":
            try:
                return self.authenticate_credentials(parts[1].decode("ascii"))
            except UnicodeDecodeError:
                raise exceptions.AuthenticationFailed("The token is not ASCII.") from None
        return super().authenticate(request)


class ApiAuthMixin:
    """Token first, so that an unauthenticated call gets 401 with ``WWW-Authenticate: Token``
    (session first would answer 403); the session serves the browsable API and the site."""

    authentication_classes = [TokenOrBearerAuthentication, SessionAuthentication]
    permission_classes = [IsAuthenticated]


def tagged(request, key: str | None, data) -> Response:
    """``data()`` as the response, in JSON with an ETag made of ``key`` (where the data is
    cached: a new key for each change), or 304 when the request's If-None-Match names it
    (then ``data`` is not called). No tag without a key."""
    # The browsable API ("api") embeds a CSRF token: only JSON may be reused by clients.
    etag = None
    if key is not None and request.accepted_renderer.format == "json":
        etag = '"' + hashlib.sha256(key.encode()).hexdigest()[:32] + '"'
    response = get_conditional_response(request, etag=etag) if etag else None
    if response is None:
        response = Response(data())
    if etag:
        response["ETag"] = etag
    # A user's own data: for no shared cache, and checked again (with its ETag) each time.
    patch_cache_control(response, private=True, no_cache=True)
    return response


@extend_schema(
    tags=["tasks"],
    description=(
        "Your own tasks (staff: every task), newest first unless ``sort`` says otherwise; "
        "orders not yet mirrored from the chain first (last when oldest first), as state "
        "pending."
    ),
    parameters=[
        OpenApiParameter("state", enum=TaskState.values, required=False),
        OpenApiParameter("sort", enum=list(TASK_LIST_SORTS), required=False, default="newest"),
    ],
)
class TaskListApi(ApiAuthMixin, generics.ListAPIView):
    """Pages are cached until the caller's tasks change (marketplace.task_lists); in JSON each
    carries an ETag, and a request whose If-None-Match names it is answered 304."""

    serializer_class = TaskSummarySerializer

    def list(self, request, *args, **kwargs):
        key = task_list_cache_key(user=request.user, kind="api", url=request.build_absolute_uri())

        def data():
            listed = super(TaskListApi, self).list
            return cache.get_or_set(
                key, lambda: listed(request, *args, **kwargs).data, LIST_CACHE_S
            )

        return tagged(request, key, data)

    def get_queryset(self):
        state = self.request.query_params.get("state")
        sort = self.request.query_params.get("sort", "newest")
        problems = {}
        if state is not None and state not in TaskState.values:
            problems["state"] = [f"Must be one of {TaskState.values}."]
        if sort not in TASK_LIST_SORTS:
            problems["sort"] = [f"Must be one of {list(TASK_LIST_SORTS)}."]
        if problems:
            raise serializers.ValidationError(problems)
        return selectors.task_view_list(user=self.request.user, state=state, sort=sort)


@extend_schema(
    tags=["tasks"],
    description=(
        "A task by its id on chain, with its bids, selected nodes, rounds, payouts, the "
        "updates of its last two rounds and its latest transactions: the same representation "
        "the task page and its live updates show (every update and transaction, a page at a "
        "time: /api/tasks/{id}/updates/ and /api/tasks/{id}/transactions/). Its buyer and "
        "staff only; 404 for anyone else. In JSON it carries an ETag, and a request whose "
        "If-None-Match names it is answered 304 until the task changes."
    ),
    responses={200: TaskSerializer, 404: ERROR_SHAPE},
)
class TaskDetailApi(ApiAuthMixin, generics.RetrieveAPIView):
    serializer_class = TaskSerializer

    def retrieve(self, request, *args, **kwargs):
        seq, view = task_view_numbered(user=request.user, task_id=self.kwargs["pk"])
        if view is None:
            raise Http404("No such task.")
        key = task_snapshot_key(view, seq=seq)
        return tagged(request, key, lambda: task_snapshot(view, seq=seq))


class _TaskRowsApi(ApiAuthMixin, generics.ListAPIView):
    """One of a task's lists, a page at a time: ``rows`` (a selector) of the task. Its buyer
    and staff only; 404 for anyone else."""

    rows: staticmethod

    def get_queryset(self):
        visible = selectors.task_visible(user=self.request.user)
        task = visible.filter(chain_task_id=self.kwargs["pk"]).first()
        if task is None:
            raise Http404("No such task.")
        return self.rows(task=task)


@extend_schema(
    tags=["tasks"],
    description="Every update submitted to a task, by round and trainer position.",
    responses={200: UpdateSerializer(many=True), 404: ERROR_SHAPE},
)
class TaskUpdateListApi(_TaskRowsApi):
    serializer_class = UpdateSerializer
    rows = staticmethod(selectors.update_list)


@extend_schema(
    tags=["tasks"],
    description="Every contract event of a task, in chain order.",
    responses={200: TransactionSerializer(many=True), 404: ERROR_SHAPE},
)
class TaskTransactionListApi(_TaskRowsApi):
    serializer_class = TransactionSerializer
    rows = staticmethod(selectors.transaction_list)


@extend_schema(
    tags=["bids"],
    description="Bids on the tasks you may see (yours; staff: every bid), optionally of one.",
    parameters=[OpenApiParameter("task", int, required=False, description="A task's id.")],
)
class BidListApi(ApiAuthMixin, generics.ListAPIView):
    serializer_class = BidSerializer

    def get_queryset(self):
        task = self.request.query_params.get("task")
        if task is not None and not (task.isascii() and task.isdigit()):
            raise serializers.ValidationError({"task": ["Must be a task's id."]})
        return selectors.bid_list(
            user=self.request.user, task_id=int(task) if task is not None else None
        )


@extend_schema(tags=["bids"], responses={200: BidSerializer, 404: ERROR_SHAPE})
class BidDetailApi(ApiAuthMixin, generics.RetrieveAPIView):
    serializer_class = BidSerializer

    def get_queryset(self):
        return selectors.bid_get_queryset(user=self.request.user)


class _DeviceSerializerMixin:
    def get_serializer_class(self):
        if getattr(self.request.user, "is_staff", False):
            return DeviceStaffSerializer
        return DevicePublicSerializer


@extend_schema(
    tags=["devices"],
    description="Enrolled devices. Staff see every field; others only what the chain shows.",
    responses=DeviceStaffSerializer,
)
class DeviceListApi(ApiAuthMixin, _DeviceSerializerMixin, generics.ListAPIView):
    def get_queryset(self):
        return selectors.device_list()


@extend_schema(tags=["devices"], responses=DeviceStaffSerializer)
class DeviceDetailApi(ApiAuthMixin, _DeviceSerializerMixin, generics.RetrieveAPIView):
    def get_queryset(self):
        return selectors.device_list()


@extend_schema(
    tags=["devices"],
    description=(
        "Tasks open for bids now, soonest deadline first. For enrolled devices, which sign the "
        "request with their key (deviceSignature), and for any signed-in user."
    ),
)
class OpenTaskListApi(generics.ListAPIView):
    serializer_class = OpenTaskSerializer
    authentication_classes = [DeviceSignatureAuthentication, *ApiAuthMixin.authentication_classes]

    def get_queryset(self):
        return selectors.open_task_list()


@extend_schema(
    tags=["devices"],
    description=(
        "The signing device's own status: its bids, the tasks it was selected for, rounds "
        "done or missed, what it earned, its credit and its data plane as the platform "
        "reaches it (what `python -m worker status` prints)."
    ),
    responses=DeviceStatusSerializer,
)
class DeviceStatusApi(APIView):
    authentication_classes = [DeviceSignatureAuthentication]
    permission_classes = [IsAuthenticated]

    def get(self, request):
        device = getattr(request.user, "device", None)
        if device is None:
            raise exceptions.PermissionDenied("Only a device may ask for its own status.")
        return Response(DeviceStatusSerializer(device_status(device=device)).data)


# ---------------------------------------------------------------- writes


@extend_schema(
    tags=["tasks"],
    description=(
        "Cancel your task while it is still bidding: the contract credits its whole budget "
        "back to your wallet (withdraw it with POST /api/wallet/withdraw/). Refused with "
        "invalid_task_state once nodes are selected."
    ),
    request=None,
    responses={
        200: inline_serializer(
            name="TaskCancelled",
            fields={
                "task_id": serializers.IntegerField(),
                "tx_hash": serializers.CharField(),
                "refund_wei": WeiField(),
            },
        ),
        403: ERROR_SHAPE,
        404: ERROR_SHAPE,
        409: ERROR_SHAPE,
    },
)
class TaskCancelApi(ApiAuthMixin, APIView):
    def post(self, request, pk: int):
        view = task_view_get(user=request.user, task_id=pk)
        if view is None:
            raise Http404("No such task.")
        receipt = task_cancel(task=view, user=request.user)
        return Response(
            {"task_id": pk, "tx_hash": receipt.tx_hash, "refund_wei": str(view.budget_wei)}
        )


@extend_schema(tags=["tasks"])
class TaskCreateApi(ApiAuthMixin, APIView):
    """Post a task on chain from your wallet, with its budget in escrow."""

    @extend_schema(
        operation_id="tasks_create",
        request=TaskCreateInputSerializer,
        responses={201: TaskSerializer, 400: ERROR_SHAPE, 409: ERROR_SHAPE},
    )
    def post(self, request):
        data = TaskCreateInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        order = task_create(buyer=request.user, **data.validated_data)
        view = task_view_get(user=request.user, task_id=order.chain_task_id)
        return Response(TaskSerializer(view).data, status=201)


@extend_schema(
    tags=["tasks"],
    description=(
        "The task's final global model, fetched from its aggregator's store with the buyer's "
        "key and checked against the model ID on chain: the task's buyer only. ``as`` "
        "flexmodel (default) is the canonical blob whose ID is on chain; keras and npz are "
        "made from it, read back and re-encoded to that ID (the X-Flex-Check header says so)."
    ),
    parameters=[
        OpenApiParameter(
            "as", str, enum=["flexmodel", "keras", "npz"], required=False, default="flexmodel"
        )
    ],
    responses={
        (200, "application/octet-stream"): OpenApiTypes.BINARY,
        403: ERROR_SHAPE,
        404: ERROR_SHAPE,
        409: ERROR_SHAPE,
        502: ERROR_SHAPE,
    },
)
class TaskModelDownloadApi(ApiAuthMixin, APIView):
    def get(self, request, pk: int):
        view = task_view_get(user=request.user, task_id=pk)
        if view is None:
            raise Http404("No such task.")
        model = task_model_download(
            task=view, user=request.user, fmt=request.query_params.get("as", "flexmodel")
        )
        return FileResponse(
            model.file,
            as_attachment=True,
            filename=model.filename,
            content_type="application/octet-stream",
            headers={
                "X-Flex-Model-Id": model.model_id,
                "X-Flex-Round": str(model.round_number),
                "X-Flex-Check": model.check,
            },
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
        # Empty: the name the join token was issued for.
        name = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")
        device_class = serializers.ChoiceField(choices=DeviceClass.choices)
        # Checked by the service, which names what is wrong (dataplane_url_invalid).
        dataplane_url = serializers.CharField(
            required=False, allow_blank=True, default="", max_length=300
        )
        dataplane_cert_sha256 = serializers.CharField(
            required=False, allow_blank=True, default="", max_length=100
        )
        # What the device will ask per round: shown in buyers' cost estimates until it bids.
        price_per_round_wei = WeiField(required=False, allow_null=True, default=None)
        aggregator_price_per_round_wei = WeiField(required=False, allow_null=True, default=None)

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
            price_per_round_wei=v["price_per_round_wei"],
            aggregator_price_per_round_wei=v["aggregator_price_per_round_wei"],
        )
        return Response(enrolment_config(device=device), status=201)
