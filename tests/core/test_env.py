"""Numbers an operator sets in the environment: a value FLEX cannot use stops the process at
start-up with one line naming the variable and what it must be."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.env import INTERVAL, PORT, WEI, SettingInvalidError, env_number

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value", [None, "", "  "])
def test_unset_or_empty_is_the_default(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("FLEX_TEST_NUMBER", raising=False)
    else:
        monkeypatch.setenv("FLEX_TEST_NUMBER", value)
    assert env_number("FLEX_TEST_NUMBER", 12) == 12


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [(" 7 ", {}, 7), ("0", {}, 0), ("2.5", INTERVAL, 2.5), (str(10**30), WEI, 10**30)],
)
def test_a_usable_value_is_read_exactly(monkeypatch, value, kind, expected):
    monkeypatch.setenv("FLEX_TEST_NUMBER", value)
    got = env_number("FLEX_TEST_NUMBER", 1, **kind)
    assert got == expected
    assert type(got) is type(expected)  # wei stay integers, never floats


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        ("twelve", {}, "expected a whole number, 0 or more; got 'twelve'"),
        ("-1", {}, "expected a whole number, 0 or more; got '-1'"),
        ("1.5", WEI, "expected a whole number of wei, 0 or more; got '1.5'"),
        ("1e18", WEI, "expected a whole number of wei, 0 or more; got '1e18'"),
        ("0", INTERVAL, "expected seconds, 0.1 or more; got '0'"),
        ("nan", INTERVAL, "expected seconds, 0.1 or more; got 'nan'"),
        ("inf", INTERVAL, "expected seconds, 0.1 or more; got 'inf'"),
        ("65536", PORT, "expected a TCP port, 1 to 65535; got '65536'"),
    ],
)
def test_an_unusable_value_is_refused_naming_the_variable(monkeypatch, value, kind, expected):
    monkeypatch.setenv("FLEX_TEST_NUMBER", value)
    with pytest.raises(SettingInvalidError) as exc:
        env_number("FLEX_TEST_NUMBER", 1, **kind)
    assert exc.value.message == f"FLEX_TEST_NUMBER: {expected}"
    assert exc.value.code == "setting_invalid"


@pytest.mark.parametrize(
    ("variable", "value"),
    [("FLEX_SYNC_REORG_DEPTH", "deep"), ("FLEX_SYNC_INTERVAL_S", "0"), ("FLEX_FAUCET_WEI", "-1")],
)
def test_the_platform_does_not_start_on_an_unusable_setting(variable, value):
    env = {"PATH": "/usr/bin:/bin", variable: value, "DJANGO_SETTINGS_MODULE": "flexsite.settings"}
    done = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"core.env.SettingInvalidError: {variable}: expected ")
    assert repr(value) in last
