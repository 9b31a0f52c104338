"""`python -m worker status`: what the platform knows of this device (bids, selected tasks,
rounds done or missed, earnings, credit, its data plane as the platform reaches it), its data
plane as seen from here, and a signed link that opens the same on the website."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

import requests
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount

from core.enrolment import owner_message
from core.errors import FlexError
from core.units import wei_to_eth
from dataplane.client import health_check
from dataplane.signing import sign_request
from dataplane.tls import node_certificate_load
from worker.config import TLS_DIR, DeviceConfig
from worker.node import Node
from worker.retention import KEEP_DAYS

STATUS_PATH = "/api/devices/me/"
OWNER_PATH = "/devices/owner/"
TIMEOUT_S = 30.0


class StatusUnavailableError(FlexError):
    """The platform did not give this device its status."""

    code = "status_unavailable"


def status_fetch(node: Node) -> dict[str, Any]:
    """The device's status from the platform's API, on a request signed with its key."""
    url = node.config.server_url.rstrip("/") + STATUS_PATH
    headers = sign_request(
        account=node.account, method="GET", url=url, server_address=node.config.contract_address
    )
    try:
        response = requests.get(url, headers=headers, timeout=TIMEOUT_S)
    except requests.RequestException as exc:
        raise StatusUnavailableError(f"cannot reach the platform at {url}: {exc}") from exc
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200:
        raise StatusUnavailableError(
            f"the platform refused: {body.get('message') or f'HTTP {response.status_code}'}",
            status=response.status_code,
            code=body.get("code"),
        )
    return body


def dataplane_problem(node: Node) -> str | None:
    """None when this device's own data plane answers at its advertised URL, else why not."""
    if not node.config.dataplane_url:
        return "no data-plane URL is configured"
    cert = node_certificate_load(node.home / TLS_DIR)
    problem = health_check(base_url=node.config.dataplane_url, cert_sha256=cert.sha256)
    if problem is not None:
        problem += " (is `python -m worker start` running?)"
    return problem


def owner_link(*, account: LocalAccount, config: DeviceConfig, hours: float = 1.0) -> str:
    """A link that opens this device's page on the website for ``hours``, signed by its key."""
    expires = int(time.time() + hours * 3600)
    text = owner_message(
        address=account.address,
        chain_id=config.chain_id,
        contract=config.contract_address,
        expires=expires,
    )
    signature = account.sign_message(encode_defunct(text=text)).signature
    query = urlencode(
        {"address": account.address, "expires": expires, "signature": "0x" + bytes(signature).hex()}
    )
    return f"{config.server_url.rstrip('/')}{OWNER_PATH}?{query}"


def _health(local: str | None, remote: str | None) -> str:
    if local is None and remote is None:
        return "healthy, seen from here and from the platform"
    seen = [("from here", local), ("from the platform", remote)]
    return "; ".join(f"{where}: {problem}" for where, problem in seen if problem)


def render(
    status: dict[str, Any], *, local_problem: str | None, link: str, models: tuple[int, int]
) -> str:
    """The status as lines for people; ETH exact. ``models``: the store's blobs and bytes."""

    def eth(wei: str | None) -> str:
        return "unknown (chain unreachable)" if wei is None else f"{wei_to_eth(int(wei))} ETH"

    lines = [
        f"device {status['name']} {status['address']} ({status['device_class']}"
        f"{', may aggregate' if status['may_aggregate'] else ''}), {status['chain_status']}",
        f"  bids       {status['bids']}, selected for {status['selected']}",
        f"  rounds     {status['rounds_done']} done, {status['rounds_missed']} missed",
        f"  earned     {eth(status['earned_wei'])}",
        f"  credit     {eth(status['credit_wei'])}, withdraw with `python -m worker withdraw`",
        f"  data plane {_health(local_problem, status['dataplane_problem'])}",
        f"  models     {models[0]} stored, {models[1]:,} bytes; a settled task's go {KEEP_DAYS} "
        "day(s) after its last (`python -m worker prune`)",
    ]
    if status["tasks"]:
        lines.append(
            "  task  state      role        price/round        selected  done  missed  paid"
        )
        for t in status["tasks"]:
            selected = "yes" if t["selected"] else "no"
            lines.append(
                f"  #{t['task_id']:<4} {t['state']:<10} {t['role']:<11} "
                f"{wei_to_eth(int(t['price_per_round_wei'])) + ' ETH':<18} {selected:<9} "
                f"{t['rounds_done']:>2}/{t['rounds']:<3} {t['rounds_missed']:>5}  "
                f"{wei_to_eth(int(t['paid_wei']))} ETH"
            )
    else:
        lines.append("  no bids yet: the device bids on tasks that fit its data while it runs")
    lines.append(f"  on the website (for an hour): {link}")
    return "\n".join(lines)
