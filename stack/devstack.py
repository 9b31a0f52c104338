"""The whole platform on one machine: chain, web, beat, platform worker, aggregator and devices.

`python -m stack.devstack run` is `make run`: it brings the stack up in order (the chain and
the contract, the database, the web server, then enrols the local devices through the real
join flow the first time), supervises every process with one prefixed log stream, and stops
them all on Ctrl-C. Everything it creates lives under var/, so a second run reuses it.
`python -m stack.devstack demo` is `make demo` (stack.demo).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import requests

from chain.launcher import free_port
from core.broker import queues_consumed, url_with
from core.env import PORT, SettingInvalidError, env_number
from core.signals import Stopper
from core.units import whole_number
from stack.backing import die_with_parent, stack_vhost, stack_vhost_delete
from stack.enrolment import (
    Enrolment,
    LocalDevice,
    PortPicker,
    enrol_all,
    ports_held,
    tokens_issue,
)

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# The local devices' keystores share one passphrase: this stack is a development platform.
LOCAL_PASSPHRASE = "flex-local-devices"


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
        self.commands: dict[str, tuple[list[str], dict[str, str] | None]] = {}
        self._width = 12
        self._lock = threading.Lock()

    def start(
        self, name: str, cmd: list[str], *, env: dict[str, str] | None = None, niceness: int = 0
    ) -> None:
        proc = die_with_parent(
            cmd,
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if niceness:
            # Its own session is its own scheduling group (Linux autogroup), within which a
            # process's nice level counts for nothing against the others: the group's does.
            with contextlib.suppress(OSError):
                Path(f"/proc/{proc.pid}/autogroup").write_text(str(niceness))
        self.procs[name] = proc
        self.commands[name] = (cmd, env)
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

    def restart(self, name: str, *, timeout: float = 15.0) -> None:
        """Stop process ``name`` (SIGTERM, then SIGKILL after ``timeout``) and start it again
        with the same command."""
        cmd, env = self.commands[name]
        self.stop(name, timeout=timeout)
        self.start(name, cmd, env=env)

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def stop(self, name: str | None = None, *, timeout: float = 15.0) -> None:
        """Stop process ``name`` (default: all, newest first, and the first started, the
        chain every other one talks to, only once the rest have stopped, so that none loses
        it on its way out). SIGTERM goes to each process alone, so that it stops its own
        children in order (a Celery worker lets its pool finish the tasks in hand, a web
        server its workers' requests); whatever is left of its process group when it has
        exited, or after ``timeout``, is killed."""
        if name:
            self._stop([name], timeout=timeout)
            self.procs.pop(name, None)
            return
        newest_first = list(reversed(self.procs))
        self._stop(newest_first[:-1], timeout=timeout)
        self._stop(newest_first[-1:], timeout=timeout)

    def _stop(self, names: list[str], *, timeout: float) -> None:
        for n in names:
            proc = self.procs.get(n)
            if proc and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for n in names:
            proc = self.procs.get(n)
            if proc is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# The platform's workers keep its books (chain sync, reports, reminders): from the second
# round on no round waits on them, since devices follow the chain themselves. On a host the
# devices share with them, they yield the CPU to training and aggregation. The web and live
# servers do not: a person waits on them.
BOOKKEEPING_NICENESS = 5


# Threads per web process: requests waiting on the database or the chain do not hold the
# others up. FLEX_DB_POOL_SIZE (10) keeps a connection for each.
WEB_THREADS = 8


def web_workers() -> int:
    """How many web server processes: FLEX_WEB_WORKERS, else one per CPU this may run on."""
    return env_number(
        "FLEX_WEB_WORKERS", len(os.sched_getaffinity(0)), low=1, what="web server processes"
    )


def chain_block_time() -> str:
    """FLEX_CHAIN_BLOCK_TIME: the local chain mines a block every so many seconds, as a public
    chain does; unset, a block per transaction, at once ("")."""
    env_number("FLEX_CHAIN_BLOCK_TIME", 0.0, kind=float, low=0.001, what="seconds")
    return os.environ.get("FLEX_CHAIN_BLOCK_TIME", "").strip()


def web_command(*, host: str, port: int, quiet: bool = False) -> list[str]:
    """The web server: every HTTP request through FLEX's WSGI application under gunicorn, in
    web_workers() processes of WEB_THREADS threads that share the port."""
    return [
        PY,
        "-m",
        "gunicorn",
        "flexsite.wsgi:application",
        "--bind",
        f"{host}:{port}",
        "--workers",
        str(web_workers()),
        "--worker-class",
        "gthread",
        "--threads",
        str(WEB_THREADS),
        # Django alone reads X-Forwarded-* (FLEX_BEHIND_PROXY), not the server as well.
        "--forwarded-allow-ips",
        "",
        # Several stacks run side by side on one machine: no shared control socket.
        "--no-control-socket",
        # A restart must not wait long on slow clients: a page simply loads again.
        "--graceful-timeout",
        "5",
        *([] if quiet else ["--access-logfile", "-"]),
    ]


def live_command(*, host: str, port: int, quiet: bool = False) -> list[str]:
    """The live server: the task pages' WebSockets (flexsite.asgi, Channels) under uvicorn."""
    return [
        PY,
        "-m",
        "uvicorn",
        "flexsite.asgi:application",
        "--host",
        host,
        "--port",
        str(port),
        "--no-proxy-headers",
        # Django's ASGI handler has no startup or shutdown events.
        "--lifespan",
        "off",
        # Open live pages must not hold a restart up: they reconnect.
        "--timeout-graceful-shutdown",
        "5",
        *(["--no-access-log"] if quiet else []),
    ]


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
    """Run a management command; one that fails stops the stack, its own message (on
    stderr) above the line that says which. It runs in a process group of its own: a Ctrl-C
    at the terminal is the stack's to act on (a command it waits for is then killed, one
    beside it finishes), not each command's to die of with a traceback."""
    done = subprocess.run(
        [PY, "manage.py", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        process_group=0,
    )
    if done.returncode:
        raise SystemExit(f"error: `manage.py {args[0]}` failed (exit {done.returncode})")
    return done.stdout.strip() if capture else ""


def _config(home: Path) -> dict:
    return json.loads((home / "device.json").read_text())


def enrolled(home: Path) -> bool:
    return (home / "device.json").exists()


def _names(devices: Sequence[LocalDevice], most: int = 6) -> str:
    shown = ", ".join(d.name for d in devices[:most])
    return shown + (f" and {len(devices) - most} more" if len(devices) > most else "")


def enrol(device: LocalDevice, *, home: Path, web_url: str, env: dict[str, str]) -> None:
    """Enrol one device through the real join flow (a join token, then `worker join`'s steps)."""
    enrol_all({device: home}, web_url=web_url, env=env)


def require_free(host: str, port: int, *, variable: str, host_variable: str) -> None:
    """Stop before anything starts when the stack's server could not listen on
    ``host:port``: another program (often a FLEX already running, another web server on
    8000 or another chain node on 8545) would answer the stack's own checks in its place,
    and the stack would deploy to its chain or enrol devices at its web server."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as sock:
            # As the servers themselves bind: a port left in TIME_WAIT by a stack that has
            # just stopped is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise SystemExit(
                f"error: {host}:{port} is taken by another program (a FLEX already running?): "
                f"stop it, or set {variable} to a free port"
            ) from None
        raise SystemExit(
            f"error: cannot listen on {host}:{port} ({exc.strerror or exc}): "
            f"set {host_variable} to an address of this machine"
        ) from None


@contextlib.contextmanager
def stack(
    *,
    var: Path,
    quiet_web: bool = False,
    devices: tuple[LocalDevice, ...] = LOCAL_DEVICES,
    homes_per_worker: int = 1,
    ephemeral: bool = False,
    enrol_waves: Sequence[int] = (),
    enrol_only: bool = False,
) -> Iterator[dict]:
    """Bring the whole platform up; yield what a client needs; tear it all down on exit.

    ``homes_per_worker`` > 1 is the simulation mode: one worker process serves several
    device identities (each with its own key, store and data-plane server). ``ephemeral``
    deletes the stack's broker vhost at the end (a benchmark's throwaway stack).

    Devices not enrolled yet are enrolled in this process, several at a time, through the
    web server and the chain; ``enrol_waves`` (say 10, 100) enrols that many first, one wave
    after the other, then the rest, and ``up["enrolments"]`` says how long each wave took
    (their join tokens are issued before, all at once: ``up["join_tokens"]``).
    ``enrol_only`` stops there: no workers, beat or buyer (a bench of enrolment alone).
    """
    # Where the web server and the chain listen, and the URL devices enrol at: loopback unless
    # the operator sets them (devices on other hosts need an address they can reach).
    web_host = os.environ.get("FLEX_WEB_HOST", "127.0.0.1")
    web_port = env_number("FLEX_WEB_PORT", 8000, **PORT)
    # Live pages' sockets: a port of their own on the same host (any free one unless set).
    live_port = env_number("FLEX_LIVE_PORT", 0, **PORT) or free_port()
    chain_host = os.environ.get("FLEX_CHAIN_HOST", "127.0.0.1")
    chain_port = env_number("FLEX_CHAIN_PORT", 8545, **PORT)
    block_time = chain_block_time()
    local_web = "127.0.0.1" if web_host in ("0.0.0.0", "::") else web_host
    local_chain = "127.0.0.1" if chain_host in ("0.0.0.0", "::") else chain_host
    public_url = os.environ.get("FLEX_PUBLIC_URL") or f"http://{local_web}:{web_port}"
    for host, port, variable, host_variable in (
        (chain_host, chain_port, "FLEX_CHAIN_PORT", "FLEX_CHAIN_HOST"),
        (web_host, web_port, "FLEX_WEB_PORT", "FLEX_WEB_HOST"),
        (web_host, live_port, "FLEX_LIVE_PORT", "FLEX_WEB_HOST"),
    ):
        require_free(host, port, variable=variable, host_variable=host_variable)
    env = {
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        **os.environ,
        # Its own broker namespace: no message of another stack reaches this one.
        **stack_vhost(var, throwaway=ephemeral),
        "DJANGO_SETTINGS_MODULE": "flexsite.settings",
        "ETH_RPC_URL": f"http://{local_chain}:{chain_port}",
        "FLEX_PUBLIC_URL": public_url,
        "FLEX_LIVE_PORT": str(live_port),
        "FLEX_VAR_DIR": str(var),
        "FLEX_DEVICE_PASSPHRASE": os.environ.get("FLEX_DEVICE_PASSPHRASE", LOCAL_PASSPHRASE),
        "PYTHONUNBUFFERED": "1",
        # The local stack, and only it, is a development deployment: debug pages, Anvil's
        # public keys, the faucet, and data planes on loopback addresses.
        "FLEX_DEBUG": os.environ.get("FLEX_DEBUG", "true"),
        "FLEX_DEV_CHAIN": "true",
        "FLEX_DATAPLANE_ALLOW_PRIVATE": "true",
    }
    web_url = f"http://{local_web}:{web_port}"
    broker_host = urlsplit(env["FLEX_BROKER_URL"]).netloc.rpartition("@")[2]
    sup = Supervisor(env=env, log_dir=var / "log")
    # Set-up commands that need not wait for each other run side by side.
    aside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stack-setup")
    try:
        mining = f"a block every {block_time} s" if block_time else "a block per transaction"
        say(
            f"starting the local chain on {chain_host}:{chain_port} "
            f"({mining}; state in {var}/chain/)"
        )
        sup.start(
            "chain",
            [
                PY,
                "-m",
                "chain.launcher",
                "--host",
                chain_host,
                "--port",
                str(chain_port),
                "--state",
                str(var / "chain" / "state.json"),
                *(["--block-time", block_time] if block_time else []),
            ],
        )
        from chain.node import connect

        w3 = connect(env["ETH_RPC_URL"])
        wait_for("the chain", lambda: w3.eth.chain_id, sup=sup)
        say("migrating the database")
        deployed = aside.submit(manage, "deploy_contract", env=env)  # the chain, no database
        manage("migrate", "--no-input", "-v", "0", env=env)
        deployed.result()
        say(f"starting the web server on {web_host}:{web_port}, advertised as {public_url}")
        sup.start("web", web_command(host=web_host, port=web_port, quiet=quiet_web))
        say(f"starting the live pages' server on {web_host}:{live_port}")
        sup.start("live", live_command(host=web_host, port=live_port, quiet=quiet_web))
        wait_for(
            "the web server", lambda: requests.get(web_url, timeout=2).status_code < 500, sup=sup
        )
        live_url = f"http://{local_web}:{live_port}"
        wait_for(
            "the live pages' server",
            lambda: requests.get(live_url, timeout=2).status_code < 500,
            sup=sup,
        )
        homes = {d.name: var / "devices" / d.name for d in devices}
        todo = [d for d in devices if not enrolled(homes[d.name])]
        enrolments: list[Enrolment] = []
        ports = PortPicker(ports_held(homes.values()))
        started = time.perf_counter()
        tokens = tokens_issue(todo, env=env) if todo else {}
        issued = Enrolment(devices=len(tokens), seconds=time.perf_counter() - started)
        if tokens:
            say(f"issued {issued.devices} join tokens in {issued.seconds:.1f} s")
        for size in [*enrol_waves, len(todo)]:
            wave, todo = todo[:size], todo[size:]
            if not wave:
                continue
            say(f"enrolling {len(wave)} device(s) with join tokens: {_names(wave)}")
            wave_homes = {d: homes[d.name] for d in wave}
            done = enrol_all(wave_homes, web_url=web_url, env=env, ports=ports, tokens=tokens)
            say(f"enrolled {done.devices} in {done.seconds:.1f} s ({done.per_device_s:.3f} s each)")
            enrolments.append(done)
        if enrol_only:
            yield {
                "supervisor": sup,
                "homes": homes,
                "env": env,
                "enrolments": enrolments,
                "join_tokens": issued,
            }
            return
        # Devices enrolled by an earlier run keep their credentials; the broker may be new.
        manage("broker_grant_devices", env=env)
        # The buyer's account and its faucet money, while the workers start.
        buyer_login = aside.submit(manage, "demo_buyer", env=env, capture=True)
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
            niceness=BOOKKEEPING_NICENESS,
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
            niceness=BOOKKEEPING_NICENESS,
        )
        # An aggregator has a process of its own: in a simulation its round's work must not
        # queue behind the training of the devices it would share a process with.
        trainers = [d.name for d in devices if not d.aggregator]
        groups = [[d.name] for d in devices if d.aggregator] + [
            trainers[i : i + homes_per_worker] for i in range(0, len(trainers), homes_per_worker)
        ]
        for i, group in enumerate(groups):
            args = [a for n in group for a in ("--home", str(homes[n]))]
            # One device, its own broker user (at the broker's address of this run: a private
            # one gets a free port); several in one process (a simulation), the platform's.
            url = url_with(_config(homes[group[0]])["broker_url"], host=broker_host)
            cmd = [PY, "-m", "worker", "start", *args, "--broker-url"]
            cmd.append(url if len(group) == 1 else env["FLEX_BROKER_URL"])
            if len(group) > 1:
                # Many devices' work: as many at once as the host has CPUs, as devices of
                # their own would train side by side.
                cmd += ["--concurrency", str(len(os.sched_getaffinity(0)))]
            sup.start(group[0] if len(group) == 1 else f"devices-{i}", cmd)
        # Work posted before the workers listen would wait in the broker past its deadlines.
        queues = ["platform", *(_config(h)["queues"][0] for h in homes.values())]
        wait_for(
            f"consumers on {len(queues)} queues",
            lambda: queues_consumed(env["FLEX_BROKER_URL"], queues),
            # Each home loads its key, data and data plane first: a simulated fleet of a
            # thousand takes minutes on a busy machine.
            timeout=180 + 2 * len(homes),
            sup=sup,
        )
        yield {
            "web_url": web_url,
            "public_url": public_url,
            "buyer": json.loads(buyer_login.result().splitlines()[-1]),
            "supervisor": sup,
            "homes": homes,
            "env": env,
            "enrolments": enrolments,
            "join_tokens": issued,
        }
    finally:
        aside.shutdown(wait=True, cancel_futures=True)
        say("stopping every process")
        sup.stop()
        if ephemeral:
            stack_vhost_delete(var)


def run(var: Path) -> int:
    stop = Stopper()
    try:
        with stack(var=var) as up:
            stop.started()
            return _serve(up, var=var, stopping=stop.stopping)
    except KeyboardInterrupt:
        say("stopped before the platform was up")
        return 130


def _serve(up: dict, *, var: Path, stopping: threading.Event) -> int:
    say(f"FLEX is up: open {up['public_url']}/")
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


SECONDS = whole_number(0, None, "a whole number of seconds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.devstack", description=__doc__)
    parser.add_argument("command", choices=["run", "demo"])
    parser.add_argument("--trainers", type=whole_number(1, 128, "trainers"), default=TRAINERS)
    parser.add_argument("--rounds", type=whole_number(1, 100, "rounds"), default=10)
    parser.add_argument("--round-timeout", type=SECONDS, default=60, help="seconds")
    parser.add_argument(
        "--bidding-window",
        type=SECONDS,
        help="seconds devices may bid (demo default: 30)",
    )
    parser.add_argument(
        "--dispute-window",
        type=SECONDS,
        help="seconds each global model may be challenged (demo default: 60)",
    )
    parser.add_argument("--kill-in-round", type=int, help="kill one trainer before this round")
    parser.add_argument("--timeout", type=float, default=600, help="give up after (seconds)")
    parser.add_argument("--min-accuracy", type=float, default=0.93)
    parser.add_argument(
        "--var", type=Path, default=Path(os.environ.get("FLEX_VAR_DIR", ROOT / "var"))
    )
    args = parser.parse_args(argv)
    try:
        return _command(args)
    except SettingInvalidError as exc:
        raise SystemExit(f"error: {exc.message}") from None


def _command(args: argparse.Namespace) -> int:
    if args.command == "run":
        return run(args.var.resolve())
    from stack.demo import BIDDING_WINDOW_S, DISPUTE_WINDOW_S, demo

    return demo(
        args.var.resolve(),
        trainers=args.trainers,
        rounds=args.rounds,
        round_timeout_s=args.round_timeout,
        kill_in_round=args.kill_in_round,
        timeout_s=args.timeout,
        min_accuracy=args.min_accuracy,
        bidding_window_s=BIDDING_WINDOW_S if args.bidding_window is None else args.bidding_window,
        dispute_window_s=DISPUTE_WINDOW_S if args.dispute_window is None else args.dispute_window,
    )


if __name__ == "__main__":
    sys.exit(main())
