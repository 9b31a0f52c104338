"""Template filters for the website: exact ETH amounts, shortened hashes, chain references."""

from __future__ import annotations

from django import template
from django.conf import settings
from django.utils.html import format_html

from core.units import wei_to_eth, wei_to_eth_approx, wei_to_eth_short

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
def eth_short(wei) -> str:
    """A balance at a glance: ETH cut to six decimals (put the exact amount beside it)."""
    try:
        return wei_to_eth_short(wei)
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


@register.simple_tag
def chain_ref(value, kind: str = "tx", full: bool = False) -> str:
    """A transaction hash, address or model ID with a copy button and, when FLEX_EXPLORER_URL
    names a block explorer, a link to it (``kind``: "tx" or "address"; a model ID has none)."""
    text = str(value or "")
    if not text:
        return "\u2013"
    shown = text if full else short(text)
    explorer = settings.FLEX_EXPLORER_URL
    link = (
        format_html(
            ' <a class="explorer" href="{}/{}/{}" target="_blank" rel="noopener noreferrer" '
            'title="Open in the block explorer">explorer</a>',
            explorer,
            kind,
            text,
        )
        if explorer and kind in ("tx", "address")
        else ""
    )
    return format_html(
        '<span class="ref"><span class="hash" title="{}">{}</span>'
        '<button type="button" class="copy" data-copy="{}" aria-label="Copy {}">copy</button>'
        "{}</span>",
        text,
        shown,
        text,
        text,
        link,
    )
