"""A device's own broker user: made at enrolment, deleted at revocation, allowed only its
own queue and its reports (core.queues.device_permissions), in this platform's vhost."""

from __future__ import annotations

from django.conf import settings
from django.utils.crypto import salted_hmac

from core.broker import BrokerAdmin, device_user_name, url_with, vhost_of
from core.queues import device_permissions
from marketplace.models import Device


def _broker_user(device: Device) -> tuple[str, str, str]:
    """The device's broker vhost, user name and password. The password is derived from the
    platform's secret key, so the platform stores none and can restore the user at will."""
    vhost = vhost_of(settings.FLEX_BROKER_URL)
    user = device_user_name(vhost=vhost, device_id=device.pk)
    return vhost, user, salted_hmac("flex.broker.device", user, algorithm="sha256").hexdigest()


def device_broker_url(*, device: Device) -> str:
    """The AMQP URL the device's worker uses: its own user, in this platform's vhost."""
    vhost, user, password = _broker_user(device)
    base = settings.FLEX_DEVICE_BROKER_URL or settings.FLEX_BROKER_URL
    return url_with(base, user=user, password=password, vhost=vhost)


def device_broker_grant(*, device: Device) -> None:
    """Create (or restore) the device's own broker user, allowed its own queue and its
    reports only (core.queues.device_permissions).

    Raises BrokerUnavailableError when the broker's management API refuses or is down.
    """
    vhost, user, password = _broker_user(device)
    BrokerAdmin(settings.FLEX_BROKER_API_URL).user_grant(
        user=user, password=password, vhost=vhost, permissions=device_permissions(device.pk)
    )


def device_broker_remove(*, device: Device) -> None:
    """Delete the device's broker user and close its connections at once (idempotent).

    Raises BrokerUnavailableError when the broker's management API refuses or is down.
    """
    _, user, _ = _broker_user(device)
    BrokerAdmin(settings.FLEX_BROKER_API_URL).user_delete(user)
