"""The whole platform on one machine: chain, web, beat, platform worker, aggregator and devices.

`python -m flexsite.devstack run` is `make run`: it brings the stack up in order (the chain and
the contract, the database, the web server, then enrols the local devices through the real
join flow the first time), supervises every process with one prefixed log stream, and stops
them all on Ctrl-C. Everything it creates lives under var/, so a second run reuses it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# The local devices' keystores share one passphrase: this stack is a development platform.
LOCAL_PASSPHRASE = "flex-local-devices"
WEB_PORT = int(os.environ.get("FLEX_WEB_PORT", 8000))
CHAIN_PORT = int(os.environ.get("FLEX_CHAIN_PORT", 8545))


@dataclass(frozen=True)
class LocalDevice:
    """One of the local stack's devices: its class, prices and slice of the digits set."""

    name: str
    device_class: str
    price_wei: int
    partition: int | None = None
    aggregator_price_wei: int | None = None

    @property
    def aggregator(self) -> bool:
        return self.aggregator_price_wei is not None


TRAINERS = 5
LOCAL_DEVICES = (
    LocalDevice("aggregator", "gpu", 3 * 10**14, aggregator_price_wei=4 * 10**14),
    LocalDevice("phone-1", "cpu", 2 * 10**14, partition=0),
    LocalDevice("phone-2", "cpu", 25 * 10**13, partition=1),
    LocalDevice("jetson-1", "jetson", 3 * 10**14, partition=2),
    LocalDevice("jetson-2", "jetson", 35 * 10**13, partition=3),
    LocalDevice("gpu-box", "gpu", 5 * 10**14, partition=4),
)


def say(message: str) -> None:
    print(f"[flex] {message}", flush=True)


class Supervisor:
    """Child processes with one prefixed log stream; stopped together, newest first."""

    def __init__(self, *, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._width = 12
        self._lock = threading.Lock()

    def start(self, name: str, cmd: list[str], *, env: dict[str, str] | None = None) -> None:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        threading.Thread(target=self._pump, args=(name, proc), daemon=True).start()

    def _pump(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            for line in iter(proc.stdout.readline, b""):
                log.write(line)
                log.flush()
                with self._lock:
                    sys.stdout.write(f"{name:<{self._width}}| {line.decode(errors='replace')}")
                    sys.stdout.flush()

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def stop(self, name: str | None = None, *, timeout: float = 15.0) -> None:
        names = [name] if name else list(reversed(self.procs))
        for n in names:
            proc = self.procs.get(n)
            if proc and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for n in names:
            proc = self.procs.get(n)
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if name:
                self.procs.pop(n, None)


def wait_for(what: str, check, *, timeout: float = 60.0, sup: Supervisor | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        if sup and sup.dead():
            raise SystemExit(f"error: {', '.join(sup.dead())} exited while waiting for {what}")
        time.sleep(0.2)
    raise SystemExit(f"error: {what} did not come up within {timeout:.0f}s")


def manage(*args: str, env: dict[str, str], capture: bool = False) -> str:
    done = subprocess.run(
        [PY, "manage.py", *args],
        cwd=ROOT,
        env=env,
        check=True,
        text=True,
        stdout=subprocess.PIPE if capture else None,
    )
    return done.stdout.strip() if capture else ""


def enrolled(home: Path) -> bool:
    return (home / "device.json").exists()


def enrol(device: LocalDevice, *, home: Path, web_url: str, env: dict[str, str]) -> None:
    args = [device.name, "--hours", "1"] + (["--aggregator"] if device.aggregator else [])
    token = manage("issue_join_token", *args, env=env, capture=True).splitlines()[-1]
    cmd = [
        PY,
        "-m",
        "worker",
        "join",
        web_url,
        token,
        "--home",
        str(home),
        "--name",
        device.name,
        "--class",
        device.device_class,
        "--price-wei",
        str(device.price_wei),
        "--no-start",
        "--light-key",
    ]
    if device.aggregator:
        cmd += ["--aggregator-price-wei", str(device.aggregator_price_wei)]
    if device.partition is not None:
        cmd += ["--partition", f"{device.partition}/{TRAINERS}"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


@contextlib.contextmanager
def stack(*, var: Path, quiet_web: bool = False) -> Iterator[dict]:
    """Bring the whole platform up; yield what a client needs; tear it all down on exit."""
    env = {
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "flexsite.settings",
        "ETH_RPC_URL": f"http://127.0.0.1:{CHAIN_PORT}",
        "FLEX_VAR_DIR": str(var),
        "FLEX_DEVICE_PASSPHRASE": os.environ.get("FLEX_DEVICE_PASSPHRASE", LOCAL_PASSPHRASE),
        "PYTHONUNBUFFERED": "1",
    }
    web_url = f"http://127.0.0.1:{WEB_PORT}"
    sup = Supervisor(env=env, log_dir=var / "log")
    try:
        say(f"starting the local chain on 127.0.0.1:{CHAIN_PORT} (state in {var}/chain/)")
        sup.start(
            "chain",
            [
                PY,
                "-m",
                "chain.launcher",
                "--port",
                str(CHAIN_PORT),
                "--state",
                str(var / "chain" / "state.json"),
            ],
        )
        from web3 import Web3

        w3 = Web3(Web3.HTTPProvider(env["ETH_RPC_URL"]))
        wait_for("the chain", lambda: w3.eth.chain_id, sup=sup)
        say("migrating the database")
        manage("migrate", "--no-input", "-v", "0", env=env)
        manage("deploy_contract", env=env)
        say(f"starting the web server on {web_url}")
        web_cmd = [PY, "-m", "daphne", "-b", "127.0.0.1", "-p", str(WEB_PORT)]
        if quiet_web:
            web_cmd += ["--access-log", os.devnull]
        sup.start("web", [*web_cmd, "flexsite.asgi:application"])
        wait_for(
            "the web server", lambda: requests.get(web_url, timeout=2).status_code < 500, sup=sup
        )
        homes = {}
        for device in LOCAL_DEVICES:
            home = var / "devices" / device.name
            homes[device.name] = home
            if not enrolled(home):
                say(f"enrolling device {device.name} ({device.device_class}) with a join token")
                enrol(device, home=home, web_url=web_url, env=env)
        buyer = json.loads(manage("demo_buyer", env=env, capture=True).splitlines()[-1])
        sup.start(
            "beat",
            [
                PY,
                "-m",
                "celery",
                "-A",
                "flexsite",
                "beat",
                "--loglevel",
                "INFO",
                "-s",
                str(var / "celerybeat-schedule"),
            ],
        )
        sup.start(
            "platform",
            [
                PY,
                "-m",
                "celery",
                "-A",
                "flexsite",
                "worker",
                "-Q",
                "platform",
                "-n",
                "platform@%h",
                "-c",
                "2",
                "--loglevel",
                "INFO",
            ],
        )
        for name, home in homes.items():
            # The broker may have moved since enrolment (a private Redis gets a free port).
            sup.start(
                name,
                [
                    PY,
                    "-m",
                    "worker",
                    "start",
                    "--home",
                    str(home),
                    "--broker-url",
                    env["REDIS_URL"],
                ],
            )
        yield {"web_url": web_url, "buyer": buyer, "supervisor": sup, "homes": homes, "env": env}
    finally:
        say("stopping every process")
        sup.stop()


def run(var: Path) -> int:
    stopping = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    with stack(var=var) as up:
        say(f"FLEX is up: open {up['web_url']}/")
        say(
            f"log in as {up['buyer']['username']} / {up['buyer']['password']} "
            f"(wallet {up['buyer']['address']}); Ctrl-C stops everything"
        )
        while not stopping.is_set():
            if dead := up["supervisor"].dead():
                say(f"error: {', '.join(dead)} exited; stopping (logs in {var}/log/)")
                return 1
            stopping.wait(0.5)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexsite.devstack", description=__doc__)
    parser.add_argument("command", choices=["run"])
    parser.add_argument(
        "--var", type=Path, default=Path(os.environ.get("FLEX_VAR_DIR", ROOT / "var"))
    )
    args = parser.parse_args(argv)
    return run(args.var.resolve())


if __name__ == "__main__":
    sys.exit(main())
