"""Find or start FLEX's backing services (Redis, RabbitMQ, the database) and run a command
beside them.

`python -m stack.backing [--postgres] -- CMD...` uses REDIS_URL when a server answers there,
else starts a private redis-server under var/; it uses the RabbitMQ at FLEX_BROKER_URL when
one answers there (enabling its management plugin when that is off and this is its host's
root), else starts a private rabbitmq-server under var/ (either installing Debian's package
when it is missing and this is a root Debian host); it keeps DATABASE_URL when set, else with
--postgres uses a PostgreSQL on 127.0.0.1:5432 when one answers, else SQLite. It says which
it chose, runs CMD with that environment, and stops what it started when CMD ends.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import redis
from kombu import Connection

from core.broker import DEFAULT_BROKER_API_URL, BrokerAdmin
from core.queues import DEFAULT_BROKER_URL

ROOT = Path(__file__).resolve().parent.parent
VAR = Path(os.environ.get("FLEX_VAR_DIR", ROOT / "var"))
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
LOCAL_POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/test"


def die_with_parent(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
    """Start ``cmd`` so that the kernel sends it SIGTERM when the thread that starts it ends,
    however its process ends (a SIGKILL included): a killed run leaves no server behind
    holding its ports or burning CPU, and the next run starts clean. Linux's ``setpriv``
    (util-linux) sets the parent-death signal and execs the command, so the pid and process
    group stay the command's; this returns once it has, so that a parent killed the moment
    after is already one its child dies with. Started from another thread than the main one,
    or where setpriv is missing, the command runs as it is (the signal follows the starting
    thread, and a pool thread ends long before the stack does)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return subprocess.Popen(cmd, **popen_kwargs)
    proc = subprocess.Popen([setpriv, "--pdeathsig", "TERM", "--", *cmd], **popen_kwargs)
    setpriv = os.path.realpath(setpriv)
    exe = f"/proc/{proc.pid}/exe"
    while proc.poll() is None:
        try:
            if os.readlink(exe) != setpriv:
                break
        except OSError:  # it has exited between the two looks
            break
        time.sleep(0.001)
    return proc


def say(message: str) -> None:
    print(f"[flex] {message}", flush=True)


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def postgres_answers(url: str) -> bool:
    try:
        import psycopg
    except ImportError:
        return False
    try:
        with psycopg.connect(url.replace("postgres://", "postgresql://", 1), connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def amqp_answers(url: str) -> bool:
    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=0)
        return True
    except Exception:  # any refusal or protocol error means: not a usable broker there
        return False


def installed(binary: str, *, package: str) -> str | None:
    """Path of ``binary``, installing Debian's ``package`` first when it is missing and this
    is a root Debian host; None when it is missing and cannot be installed."""
    found = shutil.which(binary) or (binary if Path(binary).exists() else None)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    say(f"no {Path(binary).name} found: installing Debian's {package} package")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-q", "-y", "-o", "Dpkg::Options::=--force-confold"]
    subprocess.run(["apt-get", "-q", "update"], check=False, env=env, stdout=subprocess.DEVNULL)
    subprocess.run([*apt, "install", "--no-install-recommends", package], env=env, check=True)
    return shutil.which(binary) or (binary if Path(binary).exists() else None)


def redis_server_binary() -> str | None:
    return installed("/usr/bin/redis-server", package="redis-server")


@contextlib.contextmanager
def local_redis() -> Iterator[str]:
    """A private redis-server on a free loopback port that keeps nothing on disk."""
    from chain.launcher import free_port

    binary = redis_server_binary()
    if binary is None:
        raise SystemExit(
            "error: no Redis answers at REDIS_URL and redis-server is not installed; "
            "install it (Debian: apt-get install redis-server) or set REDIS_URL"
        )
    port = free_port()
    workdir = VAR / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    proc = die_with_parent(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--logfile",
            str(workdir / "redis.log"),
        ],
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 15
        while not redis_answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"error: redis-server did not start (see {workdir}/redis.log)")
            time.sleep(0.05)
        say(f"redis: started a local redis-server at {url}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def wait_until(what: str, check, *, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"error: {what} did not start (see {log})")
        time.sleep(0.2)


class LocalRabbitMQ:
    """A private RabbitMQ node on free loopback ports, with its management API; its data lives
    under var/rabbitmq/ until ``remove``. ``restart`` stops the node and starts it again on
    the same ports and data: users, vhosts, durable queues and their messages survive."""

    def __init__(self) -> None:
        from chain.launcher import free_port

        # Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user; the real script
        # runs the node as whoever starts it, with its files where it is told.
        if installed("/usr/sbin/rabbitmq-server", package="rabbitmq-server") is None:
            raise SystemExit(
                "error: no RabbitMQ answers at FLEX_BROKER_URL and rabbitmq-server is not "
                "installed; install it (Debian: apt-get install rabbitmq-server) or set "
                "FLEX_BROKER_URL and FLEX_BROKER_API_URL"
            )
        amqp_port, api_port, dist_port = free_port(), free_port(), free_port()
        self.workdir = VAR / "rabbitmq" / str(amqp_port)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_management].\n")
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{amqp_port}\n"
            f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {api_port}\n"
            # Rounds may run long on a slow device: an unacked delivery is not a dead consumer.
            "consumer_timeout = 7200000\n"
        )
        self.env = {
            **os.environ,
            "HOME": str(self.workdir),  # the node's Erlang cookie lives here
            "RABBITMQ_NODENAME": f"flex-{amqp_port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(amqp_port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_PID_FILE": str(self.workdir / "rabbitmq.pid"),
        }
        self.url = f"amqp://guest:guest@127.0.0.1:{amqp_port}//"
        self.api_url = f"http://guest:guest@127.0.0.1:{api_port}/"
        self.proc: subprocess.Popen | None = None

    def start(self) -> LocalRabbitMQ:
        log = self.workdir / "log"
        log.mkdir(exist_ok=True)
        with open(log / "stdout.log", "ab") as out:
            self.proc = die_with_parent(
                ["/usr/lib/rabbitmq/bin/rabbitmq-server"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(
            "rabbitmq-server",
            lambda: BrokerAdmin(self.api_url).answers() and amqp_answers(self.url),
            proc=self.proc,
            log=log,
            timeout=120,
        )
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def local_rabbitmq() -> Iterator[tuple[str, str]]:
    """A private RabbitMQ node (LocalRabbitMQ), gone with its data when the block ends.
    Yields its AMQP URL and its API URL."""
    node = LocalRabbitMQ()
    try:
        node.start()
        say(f"rabbitmq: started a local rabbitmq-server at {node.url} (API {node.api_url})")
        yield node.url, node.api_url
    finally:
        node.remove()


def management_enable(api_url: str) -> bool:
    """Turn on the management plugin of the RabbitMQ on this host, when we may."""
    plugins = shutil.which("rabbitmq-plugins")
    if plugins is None or os.geteuid() != 0:
        return False
    say("rabbitmq: its management API is off; enabling the rabbitmq_management plugin")
    subprocess.run(
        [plugins, "enable", "rabbitmq_management"],
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if BrokerAdmin(api_url).answers():
            return True
        time.sleep(0.5)
    return False


def stack_vhost(var: Path, *, throwaway: bool = False) -> dict[str, str]:
    """This stack's own broker namespace: a vhost named once (FLEX_BROKER_VHOST_PREFIX and a
    random part, kept in ``var``/broker_vhost) and created when missing, so a restart finds
    its own work and no other stack's. Returns FLEX_BROKER_URL pointing at it. A
    ``throwaway`` stack (a benchmark's, deleted at its end) first deletes what throwaway
    stacks killed before their end left on the broker (BrokerAdmin.sweep_throwaway)."""
    from core.broker import new_vhost_name, url_with

    record = var / "broker_vhost"
    if record.exists():
        vhost = record.read_text().strip()
    else:
        vhost = new_vhost_name(os.environ.get("FLEX_BROKER_VHOST_PREFIX", "flex-"))
        var.mkdir(parents=True, exist_ok=True)
        record.write_text(vhost + "\n")
    admin = BrokerAdmin(os.environ.get("FLEX_BROKER_API_URL", DEFAULT_BROKER_API_URL))
    if throwaway and (swept := admin.sweep_throwaway()):
        say(f"rabbitmq: deleted {len(swept)} vhost(s) that killed runs left: {', '.join(swept)}")
    admin.vhost_create(vhost, throwaway=throwaway)
    base = os.environ.get("FLEX_BROKER_URL", DEFAULT_BROKER_URL)
    return {"FLEX_BROKER_URL": url_with(base, vhost=vhost)}


def stack_vhost_delete(var: Path) -> None:
    """Delete the stack's vhost, its messages and its device users (a stack that is done)."""
    record = var / "broker_vhost"
    if record.exists():
        api = BrokerAdmin(os.environ.get("FLEX_BROKER_API_URL", DEFAULT_BROKER_API_URL))
        api.vhost_delete(record.read_text().strip())
        record.unlink()


@contextlib.contextmanager
def backing_env(*, prefer_postgres: bool) -> Iterator[dict[str, str]]:
    """Environment variables pointing at a working Redis and database."""
    env: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
        if redis_answers(url):
            say(f"redis: using the server at {url}")
        else:
            say(f"redis: nothing answers at {url}")
            url = stack.enter_context(local_redis())
        env["REDIS_URL"] = url

        url = os.environ.get("FLEX_BROKER_URL", DEFAULT_BROKER_URL)
        api_url = os.environ.get("FLEX_BROKER_API_URL", DEFAULT_BROKER_API_URL)
        if not amqp_answers(url):
            say(f"rabbitmq: nothing answers at {url.rpartition('@')[2]}")
            url, api_url = stack.enter_context(local_rabbitmq())
        elif BrokerAdmin(api_url).answers() or management_enable(api_url):
            say(f"rabbitmq: using the server at {url.rpartition('@')[2]}")
        else:
            raise SystemExit(
                f"error: RabbitMQ answers at {url.rpartition('@')[2]} but its management API "
                "does not at FLEX_BROKER_API_URL: run `rabbitmq-plugins enable "
                "rabbitmq_management` on its host, or set FLEX_BROKER_API_URL"
            )
        env["FLEX_BROKER_URL"], env["FLEX_BROKER_API_URL"] = url, api_url

        if os.environ.get("DATABASE_URL"):
            say("database: using DATABASE_URL")
        elif prefer_postgres and postgres_answers(LOCAL_POSTGRES_URL):
            env["DATABASE_URL"] = LOCAL_POSTGRES_URL
            say(f"database: using PostgreSQL at {LOCAL_POSTGRES_URL}")
        else:
            say(f"database: SQLite under {VAR}/")
        yield env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.backing", description=__doc__)
    parser.add_argument("--postgres", action="store_true", help="prefer a local PostgreSQL")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command to run after --")
    with backing_env(prefer_postgres=args.postgres) as env:
        child = subprocess.Popen(command, env={**os.environ, **env})
        # Ctrl-C reaches the child through the terminal's process group; wait for it to finish.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: child.terminate())
        return child.wait()


if __name__ == "__main__":
    sys.exit(main())
