"""/health/: what a load balancer or a monitor asks of a FLEX web server, against the real
database, Redis, chain node and broker, and with each of the last three gone."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from chain.launcher import free_port
from core.broker import url_with
from marketplace.health import ChainNode
from marketplace.models import ChainCursor
from marketplace.sync import chain_sync

pytestmark = pytest.mark.django_db

CHECKS = ["Database", "Cache", "ChainNode", "ChainSync", "Broker"]


def health(accept: str = "application/json") -> tuple[int, dict[str, str]]:
    """The status code and each check's verdict, by the check's name."""
    response = Client().get("/health/", HTTP_ACCEPT=accept)
    verdicts = {key.split("(")[0]: value for key, value in response.json().items()}
    return response.status_code, verdicts


def test_a_platform_with_everything_up_is_healthy():
    chain_sync()

    status, verdicts = health()

    assert (status, list(verdicts)) == (200, CHECKS)
    assert set(verdicts.values()) == {"OK"}
    # The same for a monitor that reads OpenMetrics, and for a person in a browser.
    metrics = Client().get("/health/?format=openmetrics").content.decode()
    assert "django_health_check_overall_status 1" in metrics
    page = Client().get("/health/", HTTP_ACCEPT="text/html")
    assert page.status_code == 200
    assert all(name in page.content.decode() for name in CHECKS)


def test_an_unanswering_chain_node_fails_the_check_naming_it(settings):
    chain_sync()
    settings.ETH_RPC_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    status, verdicts = health()

    assert status == 500
    assert verdicts["ChainNode"] == "Unavailable: the chain node does not answer"
    assert [name for name, v in verdicts.items() if v != "OK"] == ["ChainNode"]


def test_a_stale_or_missing_chain_sync_fails_the_check(settings):
    status, verdicts = health()
    assert status == 500
    assert verdicts["ChainSync"] == "Unavailable: chain sync has not run yet"

    chain_sync()
    stale = settings.FLEX_HEALTH_SYNC_STALE_S + 30
    ChainCursor.objects.update(synced_at=timezone.now() - timedelta(seconds=stale))

    status, verdicts = health()

    assert status == 500
    assert verdicts["ChainSync"].startswith(f"Unavailable: chain sync last ran {stale:.0f} s ago")
    # The next sync (beat's, or at the next block) makes it healthy again.
    chain_sync()
    assert health() == (200, dict.fromkeys(CHECKS, "OK"))


def test_a_broker_that_refuses_fails_the_check_and_the_answer_keeps_its_address(settings, caplog):
    chain_sync()
    port = free_port()
    settings.FLEX_BROKER_URL = url_with(f"amqp://flex:s3cret-pass@127.0.0.1:{port}//", vhost="x")

    with caplog.at_level(logging.INFO):
        response = Client().get("/health/?format=text")

    assert response.status_code == 500
    text = response.content.decode()
    assert "Broker(): Unavailable: the broker does not take a connection" in text
    assert "s3cret-pass" not in text
    assert str(port) not in text
    # Each probe logs the failure on one line with its cause, no traceback, and no "Internal
    # Server Error" for the answer /health/ gives by design.
    [line] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert line.name == "health_check"
    assert line.getMessage() == (
        "Health check Broker() failed: Unavailable: the broker does not take a connection "
        "(OperationalError: [Errno 111] Connection refused)"
    )
    assert line.exc_info is None


def test_an_unexpected_failure_of_a_check_keeps_its_traceback(monkeypatch, caplog):
    chain_sync()

    def broken(self):
        raise RuntimeError("a bug in the check")

    monkeypatch.setattr(ChainNode, "run", broken)

    status, verdicts = health()

    assert status == 500
    # The answer says nothing of the bug; the log has all of it.
    assert verdicts["ChainNode"] == "Unknown Error: unknown error"
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.exc_info is not None
    assert "a bug in the check" in str(record.exc_info[1])


def test_a_check_that_hangs_is_logged_as_timed_out_on_one_line(monkeypatch, caplog):
    chain_sync()
    # The probe waits a second more than the check's timeout; the answer waits for the check.
    monkeypatch.setattr(ChainNode, "timeout", timedelta(0))
    monkeypatch.setattr(ChainNode, "run", lambda self: time.sleep(3))

    status, verdicts = health()

    assert status == 500
    assert verdicts["ChainNode"] == "Unavailable: Timed out after 0 seconds"
    [line] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert line.getMessage() == "Health check ChainNode() failed: TimeoutError"
    assert line.exc_info is None
