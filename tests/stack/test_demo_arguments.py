"""make demo's windows on the command line, and the local chain's block time: a value that
is not a length of time stops it before anything starts, and says which setting and why."""

from __future__ import annotations

import re

import pytest

from stack.devstack import chain_block_time, main


@pytest.mark.parametrize("option", ["--bidding-window", "--dispute-window"])
@pytest.mark.parametrize("value", ["-5", "1.5", "ten", ""])
def test_a_window_that_is_not_whole_seconds_is_refused_before_anything_starts(
    option, value, capsys, tmp_path
):
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--var", str(tmp_path), option, value])

    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert option in err
    assert f"expected a whole number of seconds, 0 or more; got {value!r}" in err
    assert not any(tmp_path.iterdir())  # nothing was started or written


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_a_block_time_that_is_not_seconds_is_refused_before_anything_starts(
    value, monkeypatch, tmp_path
):
    monkeypatch.setenv("FLEX_CHAIN_BLOCK_TIME", value)
    expected = f"error: FLEX_CHAIN_BLOCK_TIME: expected seconds, 0.001 or more; got '{value}'"
    with pytest.raises(SystemExit, match=re.escape(expected)):
        main(["run", "--var", str(tmp_path)])

    assert not any(tmp_path.iterdir())  # nothing was started or written


@pytest.mark.parametrize(("value", "mining"), [("", ""), (" ", ""), ("0.5", "0.5"), ("2", "2")])
def test_the_chain_mines_per_transaction_unless_a_block_time_is_set(value, mining, monkeypatch):
    monkeypatch.setenv("FLEX_CHAIN_BLOCK_TIME", value)
    assert chain_block_time() == mining


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FLEX_WEB_PORT", "80800", "expected a TCP port, 1 to 65535; got '80800'"),
        ("FLEX_CHAIN_PORT", "http", "expected a TCP port, 1 to 65535; got 'http'"),
        ("FLEX_LIVE_PORT", "-1", "expected a TCP port, 1 to 65535; got '-1'"),
    ],
)
def test_a_port_that_is_not_one_is_refused_before_anything_starts(
    variable, value, expected, monkeypatch, tmp_path
):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit, match=re.escape(f"error: {variable}: {expected}")):
        main(["run", "--var", str(tmp_path)])

    assert not any(tmp_path.iterdir())  # nothing was started or written


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--trainers", "0", "expected trainers, 1 to 128; got '0'"),
        ("--rounds", "101", "expected rounds, 1 to 100; got '101'"),
        ("--round-timeout", "-1", "expected a whole number of seconds, 0 or more; got '-1'"),
    ],
)
def test_a_demo_the_contract_cannot_run_is_refused_before_anything_starts(
    option, value, expected, capsys, tmp_path
):
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--var", str(tmp_path), option, value])

    assert stopped.value.code == 2
    assert f"{option}: {expected}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
