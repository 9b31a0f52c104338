"""Enrolling the local stack's devices: join tokens issued in bulk, then the real join flow
(HTTP to the web server, registration on chain) run in this process for many homes at once.

A device enrolled here is enrolled exactly as `python -m worker join` enrols one: its own
key, TLS certificate, signed challenge, chain registration and broker user. Only the Python
start-up per device is saved, and the devices wait on the platform side by side.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from worker.config import KEYSTORE_FILE, BidPolicy, DeviceConfig, Partition
from worker.join import join
from worker.keys import LIGHT_SCRYPT_N, key_load_or_create

ROOT = Path(__file__).resolve().parent.parent
# Enough requests in flight to keep the web server and the chain busy on two cores; more only
# queue up behind the platform's one registrar account.
ENROL_THREADS = 4
# Data-plane ports live below Linux's ephemeral range (32768+), which the kernel never hands
# out for outgoing connections: a device keeps its port across restarts of the stack.
PORTS = range(20000, 32000)


@dataclass(frozen=True)
class LocalDevice:
    """One of the local stack's devices: its class, prices and slice of the digits set (slice
    ``partition`` of the set split ``partitions`` ways by ``partition_seed``)."""

    name: str
    device_class: str
    price_wei: int
    partition: int | None = None
    aggregator_price_wei: int | None = None
    partitions: int = 5
    partition_seed: int = 0

    @property
    def aggregator(self) -> bool:
        return self.aggregator_price_wei is not None

    @property
    def slice(self) -> Partition | None:
        """What the device enrols with as its data."""
        if self.partition is None:
            return None
        return Partition(index=self.partition, count=self.partitions, seed=self.partition_seed)


@dataclass(frozen=True)
class Enrolment:
    """How long enrolling ``devices`` devices took, tokens included."""

    devices: int
    seconds: float

    @property
    def per_device_s(self) -> float:
        return self.seconds / self.devices if self.devices else 0.0


class PortPicker:
    """Free loopback ports for data planes, never the same one twice in this process, nor one
    a device already enrolled under the stack holds (its worker may not listen yet)."""

    def __init__(self, taken: Iterable[int] = ()) -> None:
        held = set(taken)
        # Every candidate once, in random order: two stacks side by side rarely collide.
        self._candidates = [p for p in PORTS if p not in held]
        random.SystemRandom().shuffle(self._candidates)
        self._lock = threading.Lock()

    def pick(self) -> int:
        with self._lock:
            while self._candidates:
                port = self._candidates.pop()
                with socket.socket() as sock:
                    try:
                        sock.bind(("127.0.0.1", port))
                    except OSError:
                        continue
                return port
        raise SystemExit(
            f"error: no free port between {PORTS.start} and {PORTS.stop} for a device's data plane"
        )


def ports_held(homes: Iterable[Path]) -> set[int]:
    """The data-plane ports of the devices already enrolled in ``homes``."""
    held = set()
    for home in homes:
        config = home / "device.json"
        if config.exists():
            held.add(json.loads(config.read_text())["dataplane_port"])
    return held


def tokens_issue(devices: Iterable[LocalDevice], *, env: Mapping[str, str]) -> dict[str, str]:
    """A join token per device (name -> raw token), valid for an hour: one `manage.py` call
    for the aggregators and one for the rest, side by side, however many devices there are."""
    devices = list(devices)
    calls = {}
    for aggregators in (True, False):
        names = [d.name for d in devices if d.aggregator == aggregators]
        if names:
            args = [*names, "--hours", "1"] + (["--aggregator"] if aggregators else [])
            calls[tuple(names)] = subprocess.Popen(
                [sys.executable, "manage.py", "issue_join_token", *args],
                cwd=ROOT,
                env=dict(env),
                text=True,
                stdout=subprocess.PIPE,
                process_group=0,  # as stack.devstack.manage's
            )
    tokens: dict[str, str] = {}
    for names, call in calls.items():
        out, _ = call.communicate()
        raw = out.split()
        if call.returncode or len(raw) != len(names):
            raise SystemExit(
                f"error: `manage.py issue_join_token` for {len(names)} devices exited with "
                f"code {call.returncode} and printed {len(raw)} tokens"
            )
        tokens.update(zip(names, raw, strict=True))
    return tokens


def enrol_one(
    device: LocalDevice,
    *,
    home: Path,
    token: str,
    web_url: str,
    passphrase: str,
    port: int,
) -> DeviceConfig:
    """What `python -m worker join --no-start --light-key` does for ``device``, in-process."""
    account = key_load_or_create(
        path=home / KEYSTORE_FILE, passphrase=passphrase, scrypt_n=LIGHT_SCRYPT_N
    )
    return join(
        server_url=web_url,
        token=token,
        account=account,
        home=home,
        name=device.name,
        device_class=device.device_class,
        policy=BidPolicy(
            price_per_round_wei=device.price_wei,
            aggregator_price_per_round_wei=device.aggregator_price_wei,
        ),
        partition=device.slice,
        dataplane_port=port,
        # Many devices wait on one registrar account side by side: a generous limit, so a
        # busy machine slows enrolment down and never fails it.
        timeout=300.0,
    )


def enrol_all(
    devices: Mapping[LocalDevice, Path],
    *,
    web_url: str,
    env: Mapping[str, str],
    threads: int = ENROL_THREADS,
    tokens: Mapping[str, str] | None = None,
    ports: PortPicker | None = None,
) -> Enrolment:
    """Enrol every device in ``devices`` (device -> its home) through the web server at
    ``web_url``, ``threads`` at a time, with ``tokens`` (device name -> raw join token; by
    default issued here with `manage.py`) and data-plane ports from ``ports`` (shared by the
    calls that enrol devices of one stack); the first failure stops the rest and is raised
    (JoinError with the platform's reason)."""
    started = time.perf_counter()
    if not devices:
        return Enrolment(devices=0, seconds=0.0)
    if tokens is None:
        tokens = tokens_issue(devices, env=env)
    ports = ports or PortPicker(ports_held(devices.values()))
    passphrase = env["FLEX_DEVICE_PASSPHRASE"]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="enrol") as pool:
        futures = [
            pool.submit(
                enrol_one,
                device,
                home=home,
                token=tokens[device.name],
                web_url=web_url,
                passphrase=passphrase,
                port=ports.pick(),
            )
            for device, home in devices.items()
        ]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return Enrolment(devices=len(devices), seconds=time.perf_counter() - started)
