"""Numbers from environment variables, checked: a value FLEX cannot use stops the process at
start-up with an error naming the variable, instead of a bare ValueError or a silent misuse
(a negative interval, a port past 65535)."""

from __future__ import annotations

import os

from core.errors import FlexError
from core.units import bounded

# What some kinds of setting must be.
WEI = {"what": "a whole number of wei"}
PORT = {"low": 1, "high": 65535, "what": "a TCP port"}
# A period a process waits between two looks: never zero, which would spin.
INTERVAL = {"kind": float, "low": 0.1, "what": "seconds"}


class SettingInvalidError(FlexError):
    """An environment variable holds a value FLEX cannot use."""

    code = "setting_invalid"


def env_number(
    name: str,
    default: int | float,
    *,
    kind: type = int,
    low: float = 0,
    high: float | None = None,
    what: str | None = None,
) -> int | float:
    """The variable ``name`` as a ``kind`` from ``low`` to ``high``, ``default`` when it is
    unset or empty; SettingInvalidError naming it otherwise."""
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    what = what or ("a whole number" if kind is int else "a number")
    try:
        return bounded(raw, low=low, high=high, what=what, kind=kind)
    except ValueError as exc:
        raise SettingInvalidError(f"{name}: {exc}", name=name, value=raw) from None
