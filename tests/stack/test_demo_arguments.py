"""make demo's options and the local stack's settings: a value the demo or the chain cannot
use (a window that is not whole seconds, a block time that is not a length of time, a port
that is not one, a task the contract would refuse) stops it before anything starts, and says
which setting and why."""

from __future__ import annotations

import re

import pytest

from stack.devstack import chain_block_time, main

SECONDS = "expected a whole number of seconds, 0 or more"
PORT = "expected a TCP port, 1 to 65535"


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        *[
            (window, value, f"{SECONDS}; got {value!r}")
            for window in ("--bidding-window", "--dispute-window")
            for value in ("-5", "1.5", "ten", "")
        ],
        ("--trainers", "0", "expected trainers, 1 to 128; got '0'"),
        ("--rounds", "101", "expected rounds, 1 to 100; got '101'"),
        ("--round-timeout", "-1", f"{SECONDS}; got '-1'"),
    ],
)
def test_an_option_the_demo_cannot_use_is_refused_before_anything_starts(
    option, value, expected, capsys, tmp_path
):
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--var", str(tmp_path), option, value])

    assert stopped.value.code == 2
    assert f"{option}: {expected}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was started or written


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        *[
            ("FLEX_CHAIN_BLOCK_TIME", value, f"expected seconds, 0.001 or more; got {value!r}")
            for value in ("0", "-1", "soon", "nan", "inf")
        ],
        ("FLEX_WEB_PORT", "80800", f"{PORT}; got '80800'"),
        ("FLEX_CHAIN_PORT", "http", f"{PORT}; got 'http'"),
        ("FLEX_LIVE_PORT", "-1", f"{PORT}; got '-1'"),
    ],
)
def test_a_setting_the_stack_cannot_use_is_refused_before_anything_starts(
    variable, value, expected, monkeypatch, tmp_path
):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit, match=re.escape(f"error: {variable}: {expected}")):
        main(["run", "--var", str(tmp_path)])

    assert not any(tmp_path.iterdir())  # nothing was started or written


@pytest.mark.parametrize(("value", "mining"), [("", ""), (" ", ""), ("0.5", "0.5"), ("2", "2")])
def test_the_chain_mines_per_transaction_unless_a_block_time_is_set(value, mining, monkeypatch):
    monkeypatch.setenv("FLEX_CHAIN_BLOCK_TIME", value)
    assert chain_block_time() == mining
