"""Find or start FLEX's backing services (Redis, the database) and run a command beside them.

`python -m stack.backing [--postgres] -- CMD...` uses REDIS_URL when a server answers there,
else starts a private redis-server under var/ (installing Debian's package when it is missing
and this is a root Debian host); it keeps DATABASE_URL when set, else with --postgres uses a
PostgreSQL on 127.0.0.1:5432 when one answers, else SQLite. It says which it chose, runs CMD
with that environment, and stops what it started when CMD ends.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
VAR = Path(os.environ.get("FLEX_VAR_DIR", ROOT / "var"))
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
LOCAL_POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/test"


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


def redis_server_binary() -> str | None:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    say("no Redis found: installing Debian's redis-server package")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-q", "-y", "-o", "Dpkg::Options::=--force-confold"]
    subprocess.run(["apt-get", "-q", "update"], check=False, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        [*apt, "install", "--no-install-recommends", "redis-server"], env=env, check=True
    )
    return shutil.which("redis-server") or "/usr/bin/redis-server"


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
    proc = subprocess.Popen(
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
