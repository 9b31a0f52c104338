"""A real HTTP forward proxy on loopback for the tests of nodes reached through one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import proxy


@contextmanager
def forward_proxy(*, basic_auth: str | None = None) -> Iterator[str]:
    """A forward proxy (plain HTTP and CONNECT tunnels), asking for ``basic_auth``
    ("user:password") when given; its URL, without credentials."""
    flags = ["--hostname", "127.0.0.1", "--port", "0", "--num-acceptors", "1", "--threadless"]
    if basic_auth is not None:
        flags += ["--basic-auth", basic_auth]
    with proxy.Proxy(flags) as running:
        yield f"http://127.0.0.1:{running.flags.port}"
