"""make demo's windows on the command line: a value that is not a length of time stops it
before anything starts, and says which option and why."""

from __future__ import annotations

import pytest

from stack.devstack import main


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
