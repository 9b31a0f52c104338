"""The REST API of a buyer's wallet: its balance and contract credit, and withdrawing it."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, extend_schema_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace import services, wallets
from marketplace.api import ERROR_SHAPE, ApiAuthMixin, WeiField


class WalletOutputSerializer(serializers.Serializer):
    address = serializers.CharField()
    balance_wei = WeiField(source="wallet_wei")
    credit_wei = WeiField()


class WithdrawalOutputSerializer(serializers.Serializer):
    account = serializers.CharField()
    amount_wei = WeiField()
    to = serializers.CharField()
    withdraw_tx = serializers.CharField()
    forward_tx = serializers.CharField(allow_null=True)
    fee_wei = WeiField()


@extend_schema(
    tags=["wallet"],
    description=(
        "Your wallet: the ETH it holds and its credit in the contract (refunds not yet "
        "withdrawn), in wei."
    ),
    responses={200: WalletOutputSerializer, 409: ERROR_SHAPE, 503: ERROR_SHAPE},
)
class WalletApi(ApiAuthMixin, APIView):
    def get(self, request):
        wallet = wallets.wallet_of(user=request.user)
        return Response(WalletOutputSerializer(wallets.wallet_holdings(wallet=wallet)).data)


class WalletWithdrawApi(ApiAuthMixin, APIView):
    """Withdraw your whole credit from the contract into your wallet, or with ``to`` on to
    another address (exactly the credit arrives there; the wallet pays the gas)."""

    @extend_schema_serializer(component_name="WalletWithdrawInput")
    class InputSerializer(serializers.Serializer):
        to = serializers.CharField(required=False, allow_blank=True, default="", max_length=100)

    @extend_schema(
        tags=["wallet"],
        request=InputSerializer,
        responses={200: WithdrawalOutputSerializer, 400: ERROR_SHAPE, 409: ERROR_SHAPE},
    )
    def post(self, request):
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        wallet = wallets.wallet_of(user=request.user)
        done = services.wallet_withdraw(wallet=wallet, to=data.validated_data["to"] or None)
        return Response(WithdrawalOutputSerializer(done).data)
