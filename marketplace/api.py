"""The REST API: thin DRF views, each calling one service."""

from __future__ import annotations

from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.models import DeviceClass
from marketplace.services import device_enrol, enrolment_config, join_challenge_issue


class JoinChallengeApi(APIView):
    """Step 1 of enrolment: trade a valid join token for a challenge to sign."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    class InputSerializer(serializers.Serializer):
        token = serializers.CharField(max_length=200)

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

    class InputSerializer(serializers.Serializer):
        token = serializers.CharField(max_length=200)
        address = serializers.CharField(max_length=42)
        signature = serializers.CharField(max_length=200)
        name = serializers.CharField(max_length=100)
        device_class = serializers.ChoiceField(choices=DeviceClass.choices)
        dataplane_url = serializers.URLField(required=False, allow_blank=True, default="")

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
        )
        return Response(enrolment_config(device=device), status=201)
