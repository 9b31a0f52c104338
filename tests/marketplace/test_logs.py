"""Logs for people: chain sync speaks at INFO only when it mirrored something, Celery's lines
about the beat's heartbeats stay out, and an expected condition is one warning line."""

from __future__ import annotations

import logging

import pytest

from core.messages import TaskStep
from marketplace import contract, tasks
from marketplace.sync import chain_sync
from tests.marketplace.people import buyer_signup, task_post

pytestmark = pytest.mark.django_db


def test_a_step_for_a_task_this_chain_lacks_is_one_warning_line(caplog):
    # A job left in the broker by an earlier run of the stack names a task that is not here.
    message = TaskStep.of(contract.deployment_identity(), task_id=10**9).dump()

    with caplog.at_level(logging.INFO):
        for step in (tasks.task_select_nodes, tasks.task_finalize, tasks.task_abort):
            assert step.run(message) is None

    lines = [r for r in caplog.records if r.name == "marketplace.tasks"]
    assert [r.levelname for r in lines] == ["WARNING"] * 3
    assert all(r.exc_info is None for r in caplog.records)  # no traceback
    assert "task_select_nodes dropped: There is no task with this id" in lines[0].getMessage()
    assert "earlier run" in lines[0].getMessage()


def test_chain_sync_speaks_only_when_something_changed(caplog):
    task_post(buyer_signup("ada"))
    with caplog.at_level(logging.INFO):
        chain_sync()
        mirrored = [r.getMessage() for r in caplog.records if r.name.startswith("marketplace")]
        caplog.clear()
        chain_sync()  # nothing new on chain
        quiet = [r for r in caplog.records if r.levelno >= logging.INFO]

    assert any("chain sync: mirrored" in m for m in mirrored)
    assert quiet == []


def test_celerys_lines_about_the_heartbeats_are_left_out(caplog):
    trace = logging.getLogger("celery.app.trace")
    with caplog.at_level(logging.INFO):
        trace.info("Task %s[%s] succeeded in %ss: %s", "marketplace.chain_sync", "a1", 0.01, {})
        logging.getLogger("celery.beat").info(
            "Scheduler: Sending due task %s (%s)",
            "lifecycle-deadlines",
            "marketplace.deadlines_check",
        )
        trace.info("Task %s[%s] succeeded in %ss: %s", "marketplace.task_finalize", "b2", 0.2, "0x")
        trace.warning("Task %s[%s] failed: %s", "marketplace.chain_sync", "c3", "boom")

    shown = [r.getMessage() for r in caplog.records]
    assert len(shown) == 2
    assert "marketplace.task_finalize" in shown[0]  # the work itself is still logged
    assert "failed" in shown[1]  # and trouble with a heartbeat too
