"""What the benchmarks read of a stack's processes: CPU counted with the children's."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from bench.procs import cpu_seconds

# Burns ``seconds`` of its own CPU, says so, then waits to be stopped.
BURN = textwrap.dedent(
    """
    import sys, time
    while time.process_time() < {seconds}:
        pass
    print("burnt", flush=True)
    sys.stdin.read()
    """
)


TICKS = 0.05


def _burner(seconds: float, *, child: float | None = None) -> subprocess.Popen:
    code = BURN.format(seconds=seconds)
    if child is not None:
        # The child burns first and stays alive beside its parent.
        code = (
            "import subprocess, sys\n"
            f"kid = subprocess.Popen([sys.executable, '-c', {BURN.format(seconds=child)!r}],"
            " stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)\n"
            "assert kid.stdout.readline().strip() == 'burnt'\n" + code
        )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "burnt"
    return proc


def test_a_process_is_charged_its_own_cpu_and_its_live_childrens():
    alone = _burner(0.4)
    parent = _burner(0.2, child=0.6)
    try:
        used = cpu_seconds({"alone": alone, "parent": parent})
    finally:
        for proc in (alone, parent):
            proc.kill()
            proc.wait()
    # /proc counts in clock ticks (10 ms), and interpreter start-up adds a little CPU of its
    # own on top of what each burnt.
    assert 0.4 - TICKS <= used["alone"] < 0.4 + 1.0
    assert 0.8 - TICKS <= used["parent"] < 0.8 + 2.0
