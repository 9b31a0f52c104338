"""What a device's owner sees of it: its bids, the tasks it was selected for, rounds done or
missed, what it earned, its credit and the health of its data plane; and the signed pass that
lets the owner open that page in a browser."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import is_hex_address, to_checksum_address

from core.enrolment import OWNER_PASS_MAX_S, owner_message
from core.errors import FlexError
from dataplane.client import health_check
from marketplace import contract
from marketplace.models import (
    PAY_REASONS,
    Bid,
    Device,
    Payout,
    Role,
    SelectedNode,
    TaskState,
    Update,
)

# Session key: the addresses whose owner pages this browser has opened with a signed pass.
OWNED_SESSION_KEY = "flex_owned_devices"


class OwnerPassError(FlexError):
    """The device owner's link is not valid."""

    code = "owner_pass_invalid"


def owner_pass_check(*, address: str, expires: str, signature: str) -> Device:
    """The enrolled device whose key signed this owner pass (core.enrolment.owner_message for
    this deployment, not expired, valid for at most OWNER_PASS_MAX_S). Raises OwnerPassError
    saying what is wrong."""
    if not is_hex_address(address or ""):
        raise OwnerPassError(f"{str(address)[:60]!r} is not an Ethereum address.")
    address = to_checksum_address(address)
    try:
        until = int(expires)
    except (TypeError, ValueError):
        raise OwnerPassError("The link has no valid expiry time.") from None
    now = int(time.time())
    if until <= now:
        raise OwnerPassError(
            "The link has expired: make a new one with `python -m worker status`.",
            expired_at=until,
        )
    if until > now + OWNER_PASS_MAX_S:
        raise OwnerPassError(
            f"The link is valid for longer than {OWNER_PASS_MAX_S // 3600} hours.", expires=until
        )
    deployment = contract.deployment_identity()
    text = owner_message(
        address=address,
        chain_id=deployment.chain_id,
        contract=deployment.contract,
        expires=until,
    )
    try:
        signer = Account.recover_message(encode_defunct(text=text), signature=signature)
    except Exception:  # eth_keys raises several unrelated types for malformed input
        raise OwnerPassError("The link's signature is malformed.") from None
    if signer != address:
        raise OwnerPassError("The link was not signed by the device's key.", signer=signer)
    device = Device.objects.filter(address=address).first()
    if device is None:
        raise OwnerPassError(f"No device {address} is enrolled here.", address=address)
    return device


def device_status(*, device: Device, check_dataplane: bool = True) -> dict[str, Any]:
    """The device's work and pay (for work: stakes and bonds coming back are not earnings),
    from the mirror; its credit from the chain (None when the
    chain cannot be read); its data plane as the platform reaches it (``dataplane_problem``
    None when healthy). Wei as ints."""
    address = device.address
    bids = list(
        Bid.objects.filter(device=address).select_related("task").order_by("-task__chain_task_id")
    )
    # Rows read into dicts: no ordering, so no join to the task just to sort by it.
    selected = {s.task_id: s for s in SelectedNode.objects.filter(device=address).order_by()}
    sent: dict[int, set[int]] = defaultdict(set)
    for task_id, number in (
        Update.objects.filter(trainer=address).order_by().values_list("task_id", "round_number")
    ):
        sent[task_id].add(number)
    paid: dict[int, int] = defaultdict(int)
    for task_id, amount in (
        Payout.objects.filter(account=address)
        .filter(reason__in=PAY_REASONS)
        .order_by()
        .values_list("task_id", "amount_wei")
    ):
        paid[task_id] += int(amount)
    tasks = []
    for bid in bids:
        task, node = bid.task, selected.get(bid.task_id)
        # A round is closed once the next global model is published (round 0 is the initial).
        closed = max(task.published_rounds - 1, 0)
        done = missed = 0
        if node is not None and node.role == Role.TRAINER:
            done = sum(1 for number in sent[bid.task_id] if number < closed)
            missed = closed - done
        elif node is not None:
            done = closed
            missed = int(task.state == TaskState.ABORTED)
        tasks.append(
            {
                "task_id": task.chain_task_id,
                "state": task.state,
                "role": bid.role,
                "price_per_round_wei": int(bid.price_per_round_wei),
                "samples": bid.samples,
                "selected": node is not None,
                "position": node.position if node is not None else None,
                "rounds": task.rounds,
                "rounds_done": done,
                "rounds_missed": missed,
                "paid_wei": paid.get(bid.task_id, 0),
            }
        )
    try:
        credit = contract.market().credit_of(account=address)
    except FlexError:
        credit = None
    problem = None
    if not device.dataplane_url:
        problem = "no data plane is registered for this device"
    elif check_dataplane:
        problem = health_check(
            base_url=device.dataplane_url, cert_sha256=device.dataplane_cert_sha256
        )
    return {
        "address": address,
        "name": device.name,
        "device_class": device.device_class,
        "may_aggregate": device.may_aggregate,
        "chain_status": device.chain_status,
        "enrolled_at": device.enrolled_at,
        "dataplane_url": device.dataplane_url,
        "dataplane_problem": problem,
        "bids": len(bids),
        "selected": len(selected),
        "rounds_done": sum(t["rounds_done"] for t in tasks),
        "rounds_missed": sum(t["rounds_missed"] for t in tasks),
        "earned_wei": sum(paid.values()),
        "credit_wei": credit,
        "tasks": tasks,
    }
