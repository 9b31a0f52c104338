"""A real HTTP forward proxy on loopback for the tests of nodes reached through one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import proxy
import pytest


@contextmanager
def forward_proxy(*, basic_auth: str | None = None) -> Iterator[str]:
    """A forward proxy (plain HTTP and CONNECT tunnels), asking for ``basic_auth``
    ("user:password") when given; its URL, without credentials."""
    flags = ["--hostname", "127.0.0.1", "--port", "0", "--num-acceptors", "1", "--threadless"]
    if basic_auth is not None:
        flags += ["--basic-auth", basic_auth]
    with proxy.Proxy(flags) as running:
        yield f"http://127.0.0.1:{running.flags.port}"


def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset every variable that names a proxy or exempts a host from one, for this test."""
    for scheme in ("HTTP", "HTTPS", "ALL", "NO"):
        for name in (f"{scheme}_PROXY", f"{scheme.lower()}_proxy"):
            monkeypatch.delenv(name, raising=False)
