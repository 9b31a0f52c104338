"""Wei, the unit every amount of money in FLEX is kept in, and ETH as people type and read it.

Amounts are ``int`` wei end to end; ETH text is converted exactly (Decimal, never float).
The browser's copy of ``wei_to_eth`` is ``FlexUnits.eth`` in static/flex/units.js.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation, localcontext

WEI_PER_ETH = 10**18
ETH_DECIMALS = 18
# A plain decimal: no sign, exponent, grouping or spaces inside. Long enough for any uint256.
_PLAIN_AMOUNT = re.compile(r"^(\d+)(?:\.(\d*))?$|^\.(\d+)$")
MAX_AMOUNT_CHARS = 100


class AmountError(ValueError):
    """An ETH amount the buyer typed is not usable; ``code`` says why."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def eth_to_wei(text: str) -> int:
    """Exact wei of a decimal ETH amount typed by a person ("0.1" -> 10**17).

    Decimal with enough precision for any amount the pattern admits, never float; raises
    AmountError for anything but a positive plain decimal with at most 18 decimals.
    """
    text = (text or "").strip()
    if text.startswith("-"):
        raise AmountError("The amount must be more than 0 ETH.", "amount_not_positive")
    match = _PLAIN_AMOUNT.match(text) if len(text) <= MAX_AMOUNT_CHARS else None
    if not match:
        raise AmountError("Enter an amount in ETH as a plain number, e.g. 0.25.", "amount_invalid")
    try:
        amount = Decimal(text)
    except InvalidOperation:  # the pattern should make this impossible; refuse rather than guess
        raise AmountError("Enter an amount in ETH, e.g. 0.25.", "amount_invalid") from None
    decimals = match.group(2) or match.group(3) or ""
    if len(decimals) > ETH_DECIMALS:
        raise AmountError(
            "ETH has at most 18 decimal places (1 wei = 0.000000000000000001 ETH).",
            "amount_too_precise",
        )
    with localcontext() as ctx:
        ctx.prec = MAX_AMOUNT_CHARS + ETH_DECIMALS
        wei = amount * WEI_PER_ETH
    if wei <= 0:
        raise AmountError("The amount must be more than 0 ETH.", "amount_not_positive")
    if wei >= 2**256:
        raise AmountError("That amount is too large.", "amount_too_large")
    return int(wei)


def wei_to_eth(wei: int | str | None) -> str:
    """Exact decimal ETH for an amount of wei, without trailing zeros ("100000000000000" ->
    "0.0001")."""
    if wei is None or wei == "":
        return ""
    wei = int(wei)
    sign = "-" if wei < 0 else ""
    whole, frac = divmod(abs(wei), WEI_PER_ETH)
    digits = f"{frac:018d}".rstrip("0")
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def wei_to_eth_approx(wei: int | str | None, *, digits: int = 3) -> str:
    """ETH rounded up to ``digits`` significant digits, for estimates (gas), never for money
    that moves: "260049112440000" -> "0.000261"."""
    if wei is None or wei == "":
        return ""
    wei = int(wei)
    if wei <= 0:
        return wei_to_eth(wei)
    unit = 10 ** max(len(str(wei)) - digits, 0)
    return wei_to_eth(-(-wei // unit) * unit)


def wei_to_eth_short(wei: int | str | None, *, decimals: int = 6) -> str:
    """ETH cut (toward zero) to ``decimals`` places, for reading a balance at a glance; the
    exact amount goes beside it: "9999791234567890123" -> "9.999791"."""
    if wei is None or wei == "":
        return ""
    wei = int(wei)
    unit = 10 ** max(18 - decimals, 0)
    sign = -1 if wei < 0 else 1
    return wei_to_eth(sign * (abs(wei) // unit) * unit)


def eth_text(wei: int | None) -> str:
    """``wei`` exactly, and in ETH for reading: ``1.5 ETH (1500000000000000000 wei)``."""
    if wei is None:
        return "-"
    return f"{wei_to_eth(wei)} ETH ({wei} wei)"


def bounded(text: str, *, low: float, high: float | None, what: str, kind: type = int):
    """``text`` as a ``kind`` (int or float) from ``low`` to ``high`` (None: no upper bound);
    ValueError that says ``what`` it must be otherwise (a float must be finite)."""
    try:
        number = kind(text.strip())
    except ValueError:
        number = None
    if (
        number is None
        or not math.isfinite(number)
        or number < low
        or (high is not None and number > high)
    ):
        upto = f" to {high}" if high is not None else " or more"
        raise ValueError(f"expected {what}, {low}{upto}; got {text!r}")
    return number


def whole_number(low: int, high: int | None, what: str) -> Callable[[str], int]:
    """An argparse ``type``: a whole number from ``low`` to ``high`` (None: no upper bound),
    refused with a message that says ``what`` it must be."""

    def parse(value: str) -> int:
        try:
            return bounded(value, low=low, high=high, what=what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


# A command-line amount: whole wei, never negative (the contract's amounts are unsigned).
wei_argument = whole_number(0, None, "a whole number of wei")
