"""Marketplace errors, each with a stable code, and the API's one exception handler."""

from __future__ import annotations

from typing import Any

from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler

from chain.errors import ContractError
from core.errors import FlexError
from dataplane.protocol import DataPlaneError
from training.errors import BlobNotFoundError, ModelIdMismatchError


class JoinTokenError(FlexError):
    """The join token is not valid."""

    code = "join_token_invalid"


class JoinChallengeError(FlexError):
    """The join challenge is missing or expired: ask for a new one."""

    code = "join_challenge_invalid"


class JoinSignatureError(FlexError):
    """The signature does not prove possession of the device's key."""

    code = "join_signature_invalid"


class DeviceAlreadyEnrolledError(FlexError):
    """A device with this address is already enrolled."""

    code = "device_already_enrolled"


class ContractNotDeployedError(FlexError):
    """No FlexMarket contract is deployed on the configured chain."""

    code = "contract_not_deployed"


_STATUS = {
    JoinTokenError: status.HTTP_403_FORBIDDEN,
    JoinSignatureError: status.HTTP_403_FORBIDDEN,
    JoinChallengeError: status.HTTP_409_CONFLICT,
    DeviceAlreadyEnrolledError: status.HTTP_409_CONFLICT,
    ContractError: status.HTTP_409_CONFLICT,
    # The platform fetched a model from an aggregator for the caller, and that failed.
    DataPlaneError: status.HTTP_502_BAD_GATEWAY,
    ModelIdMismatchError: status.HTTP_502_BAD_GATEWAY,
    BlobNotFoundError: status.HTTP_502_BAD_GATEWAY,
}
# Errors of modules that import this one, so named by code rather than class.
_STATUS_BY_CODE = {
    "not_task_buyer": status.HTTP_403_FORBIDDEN,
    "model_not_ready": status.HTTP_409_CONFLICT,
    "model_unavailable": status.HTTP_502_BAD_GATEWAY,
    "model_export_failed": status.HTTP_502_BAD_GATEWAY,
    "wallet_missing": status.HTTP_409_CONFLICT,
    "insufficient_funds": status.HTTP_409_CONFLICT,
    "insufficient_gas": status.HTTP_409_CONFLICT,
    "forward_failed": status.HTTP_502_BAD_GATEWAY,
    "not_task_aggregator": status.HTTP_403_FORBIDDEN,
}


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Every API error has one shape: ``{"code", "message", "fields"}``."""
    if isinstance(exc, FlexError):
        code = _STATUS_BY_CODE.get(exc.code) or next(
            (s for cls, s in _STATUS.items() if isinstance(exc, cls)),
            status.HTTP_400_BAD_REQUEST if not _is_unavailable(exc) else 503,
        )
        body = exc.as_dict()
        # Wei as the API gives them everywhere (serializers.WeiField): a string of digits,
        # exact in any JSON parser (a number past 2^53 is not, in JavaScript's).
        body["fields"] = {
            name: str(value) if name.endswith("_wei") and isinstance(value, int) else value
            for name, value in body["fields"].items()
        }
        return Response(body, status=code)
    response = exception_handler(exc, context)
    if response is not None:
        detail = response.data
        # The detail's own code first: DRF turns Django's Http404 and PermissionDenied into
        # NotFound / PermissionDenied details, whose codes the original exception lacks.
        if isinstance(detail, dict) and "detail" in detail:
            message, fields = str(detail["detail"]), {}
            code = getattr(detail["detail"], "code", None)
        else:
            message, fields, code = "Invalid input.", detail, None
        code = (
            code
            or getattr(getattr(exc, "detail", None), "code", None)
            or getattr(exc, "default_code", "error")
        )
        response.data = {"code": str(code), "message": message, "fields": fields}
    return response


def _is_unavailable(exc: FlexError) -> bool:
    return exc.code == "chain_unavailable"
