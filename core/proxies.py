"""The HTTP proxy the environment names for a URL, as requests would use it."""

from __future__ import annotations

import re
from typing import Any

import urllib3
from requests.utils import get_auth_from_url, get_environ_proxies, select_proxy

from core.errors import FlexError


class ProxyUrlError(FlexError):
    """The proxy the environment names is not an http:// or https:// proxy URL."""

    code = "proxy_url_invalid"


def proxy_manager(url: str, **pool_options: Any) -> urllib3.ProxyManager | None:
    """Connections to ``url`` through the proxy the environment names for it (HTTP_PROXY,
    HTTPS_PROXY, ALL_PROXY; none for a host NO_PROXY exempts), read now, with the proxy's
    own credentials when its URL carries them (``http://user:password@host:port``, sent as
    Proxy-Authorization); None when ``url`` is reached directly. ProxyUrlError when the
    environment's proxy URL is not one (its credentials left out of the error)."""
    proxy = select_proxy(url, get_environ_proxies(url))
    if not proxy:
        return None
    username, password = get_auth_from_url(proxy)
    headers = urllib3.make_headers(proxy_basic_auth=f"{username}:{password}") if username else None
    try:
        return urllib3.ProxyManager(proxy, proxy_headers=headers, **pool_options)
    except ValueError as exc:  # urllib3's URL errors: an unknown scheme, no host
        shown = re.sub(r"//[^/@]*@", "//", proxy)  # without its credentials
        raise ProxyUrlError(
            f"the proxy the environment names for {url} ({shown}) is not a proxy URL: {exc} "
            "(see HTTP_PROXY, HTTPS_PROXY, ALL_PROXY)",
            url=url,
            proxy=shown,
        ) from None
