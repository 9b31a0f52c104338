"""What a benchmark reads of the stack's processes from /proc: each counted with its children
(a Celery worker's pool, a device process's helpers)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path


def with_children(pids: list[int]) -> list[int]:
    """``pids`` and every live descendant of theirs."""
    found = list(pids)
    for pid in pids:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        found += with_children([int(c) for c in children])
    return found


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of ``pid`` and, separately counted, its children (a Celery worker's
    pool): the largest of them, in MiB."""
    peaks = []
    for one in with_children([pid]):
        try:
            status = Path(f"/proc/{one}/status").read_text()
        except OSError:
            continue
        peaks += [int(line.split()[1]) / 1024 for line in status.splitlines() if "VmHWM" in line]
    return round(max(peaks, default=0.0), 1)


def cpu_seconds(procs: Mapping[str, subprocess.Popen]) -> dict[str, float]:
    """CPU seconds each named process has used so far (tree_cpu_seconds)."""
    return {name: tree_cpu_seconds(proc.pid) for name, proc in procs.items()}


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user and system) process ``pid`` has used so far, its live children's
    and those it has reaped included."""
    ticks = 0
    for one in with_children([pid]):
        try:
            stat = Path(f"/proc/{one}/stat").read_text()
        except OSError:
            continue
        # utime, stime, cutime, cstime: fields 14 to 17, after the parenthesised name.
        ticks += sum(int(f) for f in stat.rsplit(")", 1)[1].split()[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")
