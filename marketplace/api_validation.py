"""The REST API of validation sets: buyers upload one, a task's aggregator fetches its task's."""

from __future__ import annotations

from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, extend_schema_serializer
from rest_framework import serializers
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.api import ERROR_SHAPE, ApiAuthMixin
from marketplace.permissions import DevicePrincipal, DeviceSignatureAuthentication
from marketplace.throttles import FlexRateThrottle
from marketplace.validation import validation_set_for_aggregator, validation_set_upload
from training import validation
from training.catalogue import SCHEMAS


class ValidationSetSerializer(serializers.Serializer):
    id = serializers.CharField(source="content_id", help_text="Put it in the spec's validation.")
    dataset = serializers.CharField()
    samples = serializers.IntegerField()


@extend_schema(
    tags=["tasks"],
    description=(
        "Upload a validation set for your tasks (.npz with arrays x and y, or .csv with a label "
        f"column; {validation.MIN_SAMPLES} to {validation.MAX_SAMPLES} samples, at most "
        f"{validation.MAX_UPLOAD_BYTES} bytes). Its id goes in a task spec's validation; "
        "without one, a task is scored on its schema's bundled held-out split."
    ),
    responses={201: ValidationSetSerializer, 400: ERROR_SHAPE},
)
class ValidationSetUploadApi(ApiAuthMixin, APIView):
    parser_classes = [MultiPartParser, FormParser]
    throttle_classes = [FlexRateThrottle]
    throttle_scope = "upload"

    @extend_schema_serializer(component_name="ValidationSetInput")
    class InputSerializer(serializers.Serializer):
        dataset = serializers.ChoiceField(choices=sorted(SCHEMAS))
        file = serializers.FileField(max_length=200)

    @extend_schema(operation_id="validation_sets_create", request=InputSerializer)
    def post(self, request):
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        upload = data.validated_data["file"]
        if upload.size > validation.MAX_UPLOAD_BYTES:
            raise validation.ValidationSetError(
                source=upload.name,
                reason=f"{upload.size} bytes; a validation file is at most "
                f"{validation.MAX_UPLOAD_BYTES} bytes",
            )
        row = validation_set_upload(
            data=upload.read(),
            filename=upload.name,
            dataset=data.validated_data["dataset"],
            buyer=request.user,
        )
        return Response(ValidationSetSerializer(row).data, status=201)


class IsDevice(IsAuthenticated):
    def has_permission(self, request, view) -> bool:
        return isinstance(request.user, DevicePrincipal)


@extend_schema(
    tags=["devices"],
    description=(
        "The task's validation set in its canonical bytes, for the task's selected aggregator "
        "only (deviceSignature); it checks them against the content ID in the spec."
    ),
    responses={(200, "application/octet-stream"): OpenApiTypes.BINARY, 403: ERROR_SHAPE},
)
class TaskValidationApi(APIView):
    authentication_classes = [DeviceSignatureAuthentication]
    permission_classes = [IsDevice]

    def get(self, request, pk: int):
        row = validation_set_for_aggregator(task_id=pk, device=request.user.device.address)
        return HttpResponse(
            bytes(row.data),
            content_type="application/octet-stream",
            headers={"X-Flex-Validation-Id": row.content_id},
        )
