"""A Device's chain status and registration transaction (buffered, written by the mirror)."""

from __future__ import annotations

from marketplace.models import ChainEventRecord, Device
from marketplace.sync.records import MirrorEvent

DEVICE_EVENTS = ("DeviceRegistered", "DeviceRevoked")


def device_chain_state(address: str) -> tuple[str, str]:
    """A device's chain status and latest registration transaction, from the records."""
    records = ChainEventRecord.objects.filter(name__in=DEVICE_EVENTS, args__device=address)
    latest = records.order_by("-block_number", "-log_index").first()
    if latest is None:
        return "none", ""
    registered = (
        records.filter(name="DeviceRegistered").order_by("-block_number", "-log_index").first()
    )
    status = "active" if latest.name == "DeviceRegistered" else "revoked"
    return status, registered.tx_hash if registered else ""


def device_registered(mirror, e: MirrorEvent) -> None:
    mirror.devices[e.args["device"]] = ("active", e.tx_hash)


def device_revoked(mirror, e: MirrorEvent) -> None:
    address = e.args["device"]
    _, registration_tx = mirror.devices.get(address, ("none", None))
    mirror.devices[address] = ("revoked", registration_tx)


def devices_reconcile() -> None:
    """Devices enrolled after sync saw their DeviceRegistered (the enrolment transaction
    commits after the chain call) take their status from the records."""
    for device in Device.objects.filter(chain_status="none"):
        status, registration_tx = device_chain_state(device.address)
        if status != "none":
            Device.objects.filter(pk=device.pk).update(
                chain_status=status, registration_tx=registration_tx
            )


WRITERS = {"DeviceRegistered": device_registered, "DeviceRevoked": device_revoked}
