"""FLEX's checks behind /health/ (django-health-check, beside its database and cache checks):
the chain node, chain sync keeping up with it, and the broker devices take their work from.

A load balancer or a monitor asks ``GET /health/`` (JSON with ``Accept: application/json`` or
``?format=json``, text, or OpenMetrics): 200 when every check passes, else 500 with what
failed. The messages say what is wrong, never how to reach it (no URL, no credentials)."""

from __future__ import annotations

import dataclasses
import datetime

import kombu
from django.conf import settings
from django.db.models import Max
from django.utils import timezone
from health_check.base import HealthCheck
from health_check.exceptions import ServiceUnavailable
from kombu.exceptions import OperationalError

from chain.errors import ChainUnavailableError
from chain.node import connect, reachable
from marketplace.models import ChainCursor

# What each check may take, the library's default: the probe is about liveness, not speed.
PROBE_S = 5.0


@dataclasses.dataclass
class ChainNode(HealthCheck):
    """The JSON-RPC node at ETH_RPC_URL answers."""

    timeout = datetime.timedelta(seconds=PROBE_S)

    def run(self) -> None:
        try:
            with reachable():
                connect(settings.ETH_RPC_URL, timeout=PROBE_S).eth.block_number  # noqa: B018
        except ChainUnavailableError as exc:
            raise ServiceUnavailable("the chain node does not answer") from exc


@dataclasses.dataclass
class ChainSync(HealthCheck):
    """Chain sync ran within FLEX_HEALTH_SYNC_STALE_S: it runs at every new block and every
    FLEX_SYNC_INTERVAL_S, sent by beat to the platform worker, so a stale mirror means one of
    them (or the broker between them) is down, and the website shows the chain as it was."""

    timeout = datetime.timedelta(seconds=PROBE_S)

    # Async, so the query runs on the request's thread and its connection (Django's async ORM),
    # not on one the library's executor would leave open.
    async def run(self) -> None:
        last = (await ChainCursor.objects.aaggregate(last=Max("synced_at")))["last"]
        if last is None:
            raise ServiceUnavailable("chain sync has not run yet")
        age = (timezone.now() - last).total_seconds()
        if age > settings.FLEX_HEALTH_SYNC_STALE_S:
            raise ServiceUnavailable(
                f"chain sync last ran {age:.0f} s ago: is beat or the platform worker down?"
            )


@dataclasses.dataclass
class Broker(HealthCheck):
    """The broker at FLEX_BROKER_URL takes a connection (what devices' work and reports go
    through)."""

    timeout = datetime.timedelta(seconds=PROBE_S)

    def run(self) -> None:
        try:
            with kombu.Connection(settings.FLEX_BROKER_URL, connect_timeout=PROBE_S) as conn:
                conn.ensure_connection(max_retries=0)
        except (OperationalError, OSError) as exc:
            raise ServiceUnavailable("the broker does not take a connection") from exc


# The checks /health/ runs, in its answer's order.
CHECKS = (
    "health_check.checks.Database",
    "health_check.checks.Cache",
    ChainNode,
    ChainSync,
    Broker,
)
