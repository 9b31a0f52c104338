"""Rate limits on the doors an outsider can knock on (login, token, sign-up, faucet): DRF's
scoped throttle, for API views and, through ``throttled``, for the website's pages alike."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.shortcuts import render
from rest_framework.throttling import ScopedRateThrottle


class FlexRateThrottle(ScopedRateThrottle):
    """DRF's ScopedRateThrottle, its rates read from FLEX_THROTTLE_RATES at each request (DRF
    binds DEFAULT_THROTTLE_RATES once at import). Counts per account once logged in, else
    per client address, in the shared cache."""

    def get_rate(self) -> str:
        try:
            return settings.FLEX_THROTTLE_RATES[self.scope]
        except KeyError:
            raise ImproperlyConfigured(
                f"FLEX_THROTTLE_RATES has no rate for {self.scope!r}"
            ) from None


def throttled(scope: str, *, methods: tuple[str, ...] = ("POST",), when=None):
    """Decorates a page view: requests in ``methods`` (and for which ``when(request)`` holds,
    if given) beyond the scope's rate get a 429 page saying when to try again, and the view
    does not run."""

    def decorate(view):
        holder = SimpleNamespace(throttle_scope=scope)

        @functools.wraps(view)
        def wrapper(request, *args, **kwargs):
            if request.method in methods and (when is None or when(request)):
                throttle = FlexRateThrottle()
                if not throttle.allow_request(request, holder):
                    wait = math.ceil(throttle.wait() or 1)
                    response = render(
                        request, "429.html", {"wait_s": wait, "scope": scope}, status=429
                    )
                    response["Retry-After"] = str(wait)
                    return response
            return view(request, *args, **kwargs)

        return wrapper

    return decorate
