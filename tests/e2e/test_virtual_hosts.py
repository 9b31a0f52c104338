"""The test network itself: namespaces reach the platform's bridge address, not its loopback,
and nothing is left behind, even when the test body fails."""

from __future__ import annotations

import subprocess
import sys
from http.server import HTTPServer, SimpleHTTPRequestHandler
from threading import Thread

import pytest

from tests.e2e.hosts import VirtualNetwork, tcp_forward

FETCH = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=20).status)"


def _fetch(host, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        host.command([sys.executable, "-c", FETCH, url]), capture_output=True, text=True
    )


def test_hosts_reach_the_platform_address_only_and_are_removed():
    with VirtualNetwork(["a", "b"]) as net:
        web = HTTPServer((net.platform_address, 0), SimpleHTTPRequestHandler)
        Thread(target=web.serve_forever, daemon=True).start()
        loopback = HTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
        Thread(target=loopback.serve_forever, daemon=True).start()
        try:
            for host in net.hosts.values():
                ok = _fetch(host, f"http://{net.platform_address}:{web.server_port}/")
                assert ok.stdout.strip() == "200", ok.stderr
                refused = _fetch(host, f"http://127.0.0.1:{loopback.server_port}/")
                assert refused.returncode != 0
            target = ("127.0.0.1", loopback.server_port)
            with tcp_forward(listen=(net.platform_address, 0), target=target) as port:
                relayed = _fetch(net.hosts["a"], f"http://{net.platform_address}:{port}/")
                assert relayed.stdout.strip() == "200", relayed.stderr
        finally:
            web.shutdown()
            loopback.shutdown()
    assert net.leftovers() == []


def test_a_failing_body_still_removes_the_namespaces():
    net = VirtualNetwork(["c"])

    def body() -> None:
        with net:
            assert net.leftovers() != []
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        body()
    assert net.leftovers() == []
