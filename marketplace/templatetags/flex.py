"""Template filters for the buyer website: exact ETH amounts and shortened hashes."""

from __future__ import annotations

from django import template

from core.units import wei_to_eth, wei_to_eth_approx

register = template.Library()


@register.filter
def eth(wei) -> str:
    """Wei as an exact decimal of ETH ("1500000000000000000" -> "1.5")."""
    try:
        return wei_to_eth(wei)
    except (TypeError, ValueError):
        return ""


@register.filter
def eth_approx(wei) -> str:
    """Wei as ETH rounded up to three significant digits (estimates only)."""
    try:
        return wei_to_eth_approx(wei)
    except (TypeError, ValueError):
        return ""


@register.filter
def short(value) -> str:
    """``0x1234ab…9f3c``: a hash or address short enough for a table cell."""
    text = str(value or "")
    return text if len(text) <= 14 else f"{text[:8]}…{text[-4:]}"


@register.filter
def percent(value) -> str:
    try:
        return f"{float(value) * 100:.1f}%"
    except (TypeError, ValueError):
        return "\u2013"  # en dash: no value


@register.filter
def get_item(mapping, key):
    """``mapping[key]`` in a template, None when absent."""
    return mapping.get(key) if hasattr(mapping, "get") else None
