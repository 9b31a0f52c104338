"""A trainer checks a published model below the priority of training and aggregation: the
check has its dispute window to finish in, the round in progress waits for the slowest
trainer and the aggregator on the cores they share."""

from __future__ import annotations

import multiprocessing
import os
import threading

import pytest

from worker.watcher import CHECK_NICENESS, yielding


def niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_a_check_runs_below_the_callers_priority_and_the_caller_keeps_its_own():
    mine = niceness()
    assert yielding(niceness)() == min(mine + CHECK_NICENESS, 19)
    assert niceness() == mine


def test_what_a_check_raises_reaches_its_caller():
    def broken() -> None:
        raise ValueError("the aggregator's opening does not match")

    with pytest.raises(ValueError, match="does not match"):
        yielding(broken)()
    assert yielding(lambda: "checked")() == "checked"  # the checking thread goes on


def _in_child(answer: multiprocessing.Queue) -> None:
    answer.put(yielding(threading.get_native_id)() != threading.get_native_id())


def test_a_forked_child_checks_in_a_thread_of_its_own():
    yielding(niceness)()  # the parent's checking thread exists before the fork
    context = multiprocessing.get_context("fork")
    answer = context.Queue()
    child = context.Process(target=_in_child, args=(answer,))
    child.start()
    assert answer.get(timeout=120) is True
    child.join(timeout=120)
    assert child.exitcode == 0
