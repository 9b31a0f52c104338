"""The HTTP proxy the environment names for a URL, as requests would use it."""

from __future__ import annotations

from typing import Any

import urllib3
from requests.utils import get_auth_from_url, get_environ_proxies, select_proxy


def proxy_manager(url: str, **pool_options: Any) -> urllib3.ProxyManager | None:
    """Connections to ``url`` through the proxy the environment names for it (HTTP_PROXY,
    HTTPS_PROXY, ALL_PROXY; none for a host NO_PROXY exempts), read now, with the proxy's
    own credentials when its URL carries them (``http://user:password@host:port``, sent as
    Proxy-Authorization); None when ``url`` is reached directly."""
    proxy = select_proxy(url, get_environ_proxies(url))
    if not proxy:
        return None
    username, password = get_auth_from_url(proxy)
    headers = urllib3.make_headers(proxy_basic_auth=f"{username}:{password}") if username else None
    return urllib3.ProxyManager(proxy, proxy_headers=headers, **pool_options)
