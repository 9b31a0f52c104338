"""The processes running on this machine, as the tests that start and stop them see them."""

from __future__ import annotations

import subprocess


def running(pattern: str) -> dict[int, str]:
    """Process ID -> command line of each process whose command line matches ``pattern``
    (an extended regular expression, as ``pgrep -f`` takes it)."""
    found = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
    return {
        int(pid): command
        for pid, _, command in (line.partition(" ") for line in found.splitlines())
    }
