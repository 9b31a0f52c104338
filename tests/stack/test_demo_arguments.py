"""make demo's options and the local stack's settings: a value the demo or the chain cannot
use (a window that is not whole seconds, a block time that is not a length of time, a port
that is not one or that another program holds, a task the contract would refuse) stops it
before anything starts, and says which setting and why."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from chain.launcher import free_port
from stack.devstack import chain_block_time, main, manage

ROOT = Path(__file__).resolve().parents[2]
PORTS = ("FLEX_CHAIN_PORT", "FLEX_WEB_PORT", "FLEX_LIVE_PORT")

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


@pytest.mark.parametrize("variable", PORTS)
def test_a_port_another_program_listens_on_is_refused_before_anything_starts(
    variable, monkeypatch, tmp_path
):
    """Another web server on 8000 or chain node on 8545 would answer the stack's checks in
    place of its own servers, which could not bind: the stack would deploy to that chain or
    enrol its devices at that server."""
    for name in PORTS:
        monkeypatch.setenv(name, str(free_port()))
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        monkeypatch.setenv(variable, str(port))
        with pytest.raises(SystemExit) as stopped:
            main(["run", "--var", str(tmp_path)])

    assert stopped.value.code == (
        f"error: 127.0.0.1:{port} is taken by another program (a FLEX already running?): "
        f"stop it, or set {variable} to a free port"
    )
    assert not any(tmp_path.iterdir())  # nothing was started or written


def test_a_host_address_this_machine_lacks_is_refused_before_anything_starts(tmp_path):
    """Run in a network namespace of its own (unshare), with only its loopback up: 10.77.0.1
    is no address of that host's."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip")):
        pytest.fail("this test makes a network namespace: it needs root, unshare and ip")
    port = free_port()
    in_namespace = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    done = subprocess.run(
        [*in_namespace, sys.executable, "-m", "stack.devstack", "run", "--var", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "FLEX_CHAIN_HOST": "10.77.0.1", "FLEX_CHAIN_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: cannot listen on 10.77.0.1:{port} (Cannot assign requested address): "
        "set FLEX_CHAIN_HOST to an address of this machine"
    )
    assert not any(tmp_path.iterdir())


def test_a_failed_set_up_command_stops_the_stack_with_one_line_naming_it(capfd):
    with pytest.raises(SystemExit) as stopped:
        manage("no_such_command", env=dict(os.environ))

    assert stopped.value.code == "error: `manage.py no_such_command` failed (exit 1)"
    assert "Unknown command: 'no_such_command'" in capfd.readouterr().err  # its own, above


@pytest.mark.parametrize(("value", "mining"), [("", ""), (" ", ""), ("0.5", "0.5"), ("2", "2")])
def test_the_chain_mines_per_transaction_unless_a_block_time_is_set(value, mining, monkeypatch):
    monkeypatch.setenv("FLEX_CHAIN_BLOCK_TIME", value)
    assert chain_block_time() == mining
