"""Device-signed API requests (who may see a task is selectors.task_visible, for every surface).

Devices hold no Django account. An enrolled device authenticates a request by signing it with
its own Ethereum key in the data plane's format (dataplane.signing: EIP-191 over scheme,
method, full path, host, server address, unix time and a nonce, in the X-Flex-* headers),
naming the FlexMarket contract's address as the server. A device signs platform requests with
the helper it already has, ``sign_request(url=..., server_address=<contract address>)``; since
no node's address is a contract's, a signature meant for a data-plane node never verifies
here, nor one meant for the platform at a node. Signatures are good for 60 seconds either
side of the server's clock, once (nonces are remembered in the shared cache, so a replay to
another web process is refused too), and only from devices enrolled here and not revoked;
devices may only read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from django.core.cache import cache
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication

from dataplane.addresses import authority
from dataplane.protocol import (
    HEADER_ADDRESS,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    AuthError,
)
from dataplane.signing import verify_request
from marketplace import contract
from marketplace.models import Device


@dataclass(frozen=True)
class DevicePrincipal:
    """``request.user`` for a device-signed request: a device, never a Django user."""

    device: Device
    is_authenticated = True
    is_anonymous = False
    is_staff = False
    is_superuser = False
    pk = None

    def __str__(self) -> str:
        return f"device {self.device.address}"


class CacheNonces:
    """Nonces of device-signed requests in Django's cache (the platform's Redis), shared by
    every web process: ``cache.add`` stores a key only if it is absent, atomically."""

    def claim(self, *, signer: str, nonce: str, expires_at: float) -> bool:
        ttl = max(1, math.ceil(expires_at - time.time()))
        return cache.add(f"dataplane-nonce:{signer.lower()}:{nonce}", 1, timeout=ttl)


class DeviceSignatureAuthentication(BaseAuthentication):
    """Authenticates a request signed by an enrolled device's key (see the module docstring)."""

    def authenticate(self, request) -> tuple[DevicePrincipal, str] | None:
        if HEADER_SIGNATURE not in request.headers:
            return None  # not a device request: let token or session authentication try
        try:
            signer = verify_request(
                headers=request.headers,
                method=request.method,
                path=request.get_full_path(),
                authority=authority(request.build_absolute_uri("/")),
                server_address=contract.address(),
                nonces=CacheNonces(),
            )
        except AuthError as exc:
            raise exceptions.AuthenticationFailed(detail=exc.message, code=exc.code) from exc
        device = Device.objects.filter(address=signer).exclude(chain_status="revoked").first()
        if device is None:
            raise exceptions.AuthenticationFailed(
                detail=f"{signer} is not an enrolled, unrevoked device.", code="device_unknown"
            )
        return DevicePrincipal(device=device), "device-signature"

    def authenticate_header(self, request) -> str:
        return 'FlexSignature realm="api"'


class DeviceSignatureScheme(OpenApiAuthenticationExtension):
    """Describes device-signed requests in the OpenAPI schema."""

    target_class = DeviceSignatureAuthentication
    name = "deviceSignature"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": HEADER_SIGNATURE,
            "description": (
                "An enrolled device's EIP-191 signature over the request's method, full path, "
                "host, unix time and a single-use nonce, made by dataplane.signing.sign_request "
                f"with the FlexMarket contract's address as server_address; {HEADER_ADDRESS}, "
                f"{HEADER_TIMESTAMP} and {HEADER_NONCE} go beside it."
            ),
        }
