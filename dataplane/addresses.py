"""Where a node's data plane may be: the rules for an advertised ``dataplane_url``, and the
authority (host:port) that signed requests name."""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from core.errors import FlexError

_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*")
_DEFAULT_PORTS = {"https": 443, "http": 80}


class DataPlaneUrlError(FlexError):
    """Not a data-plane URL: a plain https URL of a host (and port) is expected."""

    code = "dataplane_url_invalid"

    def default_message(self, *, url: str = "?", reason: str = "malformed", **_: Any) -> str:
        return (
            f"dataplane_url {url!r} is refused: {reason}. Give a plain https URL of the host "
            "peers reach, such as https://device.example.org:8443"
        )


def _private(host: str) -> bool:
    """Whether ``host`` (an IP literal or a name) is loopback, private or link-local."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a DNS name: its owner answers for where it points
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved


def dataplane_url_check(url: str, *, allow_private: bool) -> str:
    """``url`` as a node's advertised data-plane URL, normalised to ``https://host:port``.

    Refused (DataPlaneUrlError, naming the reason): another scheme than https; a path, query,
    fragment or user name; a malformed host or port; an unspecified or multicast address; and
    a loopback, private or link-local address unless ``allow_private`` (a one-host or one-LAN
    deployment). Peers and the web server connect where it says, so it may name nothing else.
    """
    shown = str(url)[:200]
    if not isinstance(url, str) or not url or any(c.isspace() or ord(c) < 32 for c in url):
        raise DataPlaneUrlError(url=shown, reason="it is empty or holds spaces or controls")
    parts = urlsplit(url)
    if parts.scheme.lower() != "https":
        raise DataPlaneUrlError(url=shown, reason="the scheme must be https")
    if "?" in url or "#" in url:
        raise DataPlaneUrlError(url=shown, reason="it may hold no query (?) or fragment (#)")
    if "@" in parts.netloc:
        raise DataPlaneUrlError(url=shown, reason="it may hold no user name or password (@)")
    if parts.path not in ("", "/"):
        raise DataPlaneUrlError(url=shown, reason="it may hold no path")
    try:
        port = 443 if parts.port is None else parts.port
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise DataPlaneUrlError(url=shown, reason="the port is not 1-65535")
    host = (parts.hostname or "").lower()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
        if not _HOSTNAME.fullmatch(host):
            raise DataPlaneUrlError(url=shown, reason="the host is not a DNS name or IP") from None
    if ip is not None and (ip.is_unspecified or ip.is_multicast):
        raise DataPlaneUrlError(url=shown, reason=f"{host} is not an address peers can reach")
    if not allow_private and _private(host):
        raise DataPlaneUrlError(
            url=shown,
            reason=f"{host} is a loopback, private or link-local address, which this "
            "platform does not accept (FLEX_DATAPLANE_ALLOW_PRIVATE is off)",
        )
    shown_host = f"[{host}]" if ip is not None and ip.version == 6 else host
    return f"https://{shown_host}:{port}"


def authority(url: str) -> str:
    """The ``host:port`` a request to ``url`` is addressed to, lower-case, port explicit:
    what a signed request names, so that it cannot be replayed to another host."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower(), 0)
    return f"{host}:{port}"
