"""Several hosts on one machine for the end-to-end tests: Linux network namespaces joined by a
bridge, made by the test and removed when it ends, even when it fails.

The platform stays in the root namespace and is reached at the bridge's address (never at
127.0.0.1, which a namespace cannot see); every other host is a namespace of its own with
its own address on the bridge. Services that listen on loopback only (the machine's
RabbitMQ, say) are published on the bridge address by ``tcp_forward``. Making namespaces
needs root (CI runs as root); where it cannot be done, ``VirtualNetwork`` raises
HostsUnavailableError with the reason, and the test fails with it rather than skipping.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


class HostsUnavailableError(RuntimeError):
    """This machine cannot make network namespaces (not root, or no `ip`)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass(frozen=True)
class Host:
    """One namespace: its name, its address on the bridge, and how to run a command in it."""

    name: str
    namespace: str
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


class VirtualNetwork:
    """A bridge with ``platform_address`` in the root namespace, and one namespace per host.

    Names carry this process's id, so two test runs on one machine never collide; the subnet
    is picked from 10.200.0.0/13 by the same id.
    """

    def __init__(self, hosts: Sequence[str]) -> None:
        if os.geteuid() != 0:
            raise HostsUnavailableError("network namespaces need root; run the tests as root")
        if shutil.which("ip") is None:
            raise HostsUnavailableError("the `ip` command is missing (Debian: iproute2)")
        tag = os.getpid() % 100_000
        base = ipaddress.ip_network("10.200.0.0/13")
        subnet = list(base.subnets(new_prefix=24))[tag % 2048]
        self.bridge = f"flexbr{tag}"
        self.prefix = subnet.prefixlen
        addresses = list(subnet.hosts())
        self.platform_address = str(addresses[0])
        self.hosts = {
            name: Host(name=name, namespace=f"flex{tag}-{i}", address=str(addresses[10 + i]))
            for i, name in enumerate(hosts)
        }
        self._veths: list[str] = []

    def __enter__(self) -> VirtualNetwork:
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _create(self) -> None:
        created = _ip("link", "add", self.bridge, "type", "bridge", check=False)
        if created.returncode != 0:
            raise HostsUnavailableError(f"cannot make a bridge: {created.stderr.strip()}")
        _ip("addr", "add", f"{self.platform_address}/{self.prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, host in enumerate(self.hosts.values()):
            outside, inside = f"{self.bridge}h{i}", f"{self.bridge}n{i}"
            _ip("netns", "add", host.namespace)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            self._veths.append(outside)
            _ip("link", "set", inside, "netns", host.namespace)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            inns = ["netns", "exec", host.namespace, "ip"]
            _ip(*inns, "addr", "add", f"{host.address}/{self.prefix}", "dev", inside)
            _ip(*inns, "link", "set", inside, "up")
            _ip(*inns, "link", "set", "lo", "up")

    def remove(self) -> None:
        """Kill what still runs in the namespaces, then delete them, their links and the bridge."""
        for host in self.hosts.values():
            pids = _ip("netns", "pids", host.namespace, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            _ip("netns", "del", host.namespace, check=False)
        for veth in self._veths:
            _ip("link", "del", veth, check=False)
        _ip("link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        """Namespaces or links of this network still present (empty after ``remove``)."""
        namespaces = _ip("netns", "list", check=False).stdout
        links = _ip("-br", "link", check=False).stdout
        found = [h.namespace for h in self.hosts.values() if h.namespace in namespaces]
        return found + ([self.bridge] if self.bridge in links else [])


@contextlib.contextmanager
def tcp_forward(*, listen: tuple[str, int], target: tuple[str, int]) -> Iterator[int]:
    """Relay TCP connections from ``listen`` to ``target`` (port 0 picks a free port; the
    port is yielded) until the block ends: publishes a loopback-only service on the bridge."""
    server = socket.create_server(listen)
    server.settimeout(0.2)
    stop = threading.Event()

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(target)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=serve, name="tcp-forward", daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()
        thread.join(5)
