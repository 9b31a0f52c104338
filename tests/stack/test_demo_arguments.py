"""make demo's windows on the command line, and the local chain's block time: a value that
is not a length of time stops it before anything starts, and says which setting and why."""

from __future__ import annotations

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
    assert "is not a whole number of seconds" in err
    assert not any(tmp_path.iterdir())  # nothing was started or written


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_a_block_time_that_is_not_seconds_is_refused_before_anything_starts(
    value, monkeypatch, tmp_path
):
    monkeypatch.setenv("FLEX_CHAIN_BLOCK_TIME", value)
    with pytest.raises(SystemExit, match=f"FLEX_CHAIN_BLOCK_TIME must be .* not '{value}'"):
        main(["run", "--var", str(tmp_path)])

    assert not any(tmp_path.iterdir())  # nothing was started or written


@pytest.mark.parametrize(("value", "mining"), [("", ""), (" ", ""), ("0.5", "0.5"), ("2", "2")])
def test_the_chain_mines_per_transaction_unless_a_block_time_is_set(value, mining, monkeypatch):
    monkeypatch.setenv("FLEX_CHAIN_BLOCK_TIME", value)
    assert chain_block_time() == mining
