"""Load the task list page and the tasks API from a second process; write var/bench/web.json.

`python -m bench.web` makes a throwaway database (a new PostgreSQL database beside DATABASE_URL
when that is PostgreSQL, else a temporary SQLite file), seeds one buyer with 1,000 tasks and
10,000 bids on them from 100 devices (bulk_create), counts the queries one request for each URL
makes (in this process, with Django's test client; ``--explain`` prints their plans on
PostgreSQL), serves FLEX as the local stack does (gunicorn, one worker process per CPU unless
FLEX_WEB_WORKERS says otherwise, WEB_THREADS threads each) on a free loopback port, and drives
each URL from a separate process over keep-alive connections (aiohttp, 16 at a time, bounded in
requests and seconds), signed in as that buyer: the session cookie for the page, the API token
for the API. Only 127.0.0.1 is used. Figures are indicative: the machines are shared and noisy;
the server's CPU time per request ("cpu ms", all its processes) depends much less on the other
load than the rate does. "queries" counts those of a request served from the task-list cache,
"changed" those of one right after the buyer's tasks changed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import MAX_BIDS, MAX_ROUNDS, MAX_TRAINERS, verdict
from stack.devstack import WEB_THREADS, web_command, web_workers

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "var" / "bench" / "web.json"
HOST = "127.0.0.1"
TASKS = 1000
BIDS = 10_000
DEVICES = 100
CONCURRENCY = 16
MAX_REQUESTS = 3000
MAX_SECONDS = 15.0
WARMUP_REQUESTS = 50
SERVER_START_TIMEOUT_S = 60.0
BUYER = "bench-buyer"
# Goals at the default sizes: requests per second of each URL, and the slowest 1 % under.
TARGET_RPS = {"task_list": 200, "api_tasks": 300}
TARGET_P99_MS = 250
# A task at FlexMarket's limits, whose page and API detail are measured beside the lists.
LIMITS = {"bids": MAX_BIDS, "trainers": MAX_TRAINERS, "rounds": MAX_ROUNDS}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- the load generator


async def _drive(
    url: str, headers: dict[str, str], *, concurrency: int, requests: int, seconds: float
) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    failures: dict[str, int] = {}
    issued = 0
    deadline = 0.0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            started = time.perf_counter()
            try:
                async with session.get(url, allow_redirects=False) as response:
                    await response.read()
                    ok = response.status == 200
                    status = str(response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                ok, status = False, type(exc).__name__
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                failures[status] = failures.get(status, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=timeout
    ) as session:
        # Warm-up (not measured): connections opened, Django's first-request work done.
        async def fetch() -> None:
            # A page too slow for the client's timeout shows as failures below, not a crash.
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url, allow_redirects=False) as response:
                    await response.read()

        for _ in range(WARMUP_REQUESTS // concurrency + 1):
            await asyncio.gather(*(fetch() for _ in range(concurrency)))
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started

    latencies.sort()
    return {
        "requests": len(latencies),
        "failures": failures,
        "seconds": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(1000 * statistics.median(latencies), 2) if latencies else None,
        "p99_ms": round(1000 * _percentile(latencies, 0.99), 2) if latencies else None,
        "max_ms": round(1000 * latencies[-1], 2) if latencies else None,
        "concurrency": concurrency,
    }


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, int(-(-q * len(ordered) // 1)))
    return ordered[min(rank, len(ordered)) - 1]


def drive_main(args: argparse.Namespace) -> int:
    headers = json.loads(args.headers)
    result = asyncio.run(
        _drive(
            args.url,
            headers,
            concurrency=args.concurrency,
            requests=args.requests,
            seconds=args.seconds,
        )
    )
    print(json.dumps(result))
    return 0


def drive(url: str, headers: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Run the load generator in its own process, so client and server do not share a CPU
    interpreter lock."""
    command = [
        sys.executable,
        "-m",
        "bench.web",
        "drive",
        url,
        "--headers",
        json.dumps(headers),
        "--concurrency",
        str(args.concurrency),
        "--requests",
        str(args.requests),
        "--seconds",
        str(args.seconds),
    ]
    out = subprocess.run(
        command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=args.seconds + 120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the server side


@contextlib.contextmanager
def throwaway_database() -> Iterator[str]:
    """A DATABASE_URL for a database that exists only for this run."""
    base = os.environ.get("DATABASE_URL", "")
    if base.startswith(("postgres://", "postgresql://")):
        import psycopg

        name = f"flex_bench_web_{os.getpid()}_{secrets.token_hex(3)}"
        admin_url = base.replace("postgres://", "postgresql://", 1)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield base.rsplit("/", 1)[0] + "/" + name
        finally:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    else:
        with tempfile.TemporaryDirectory(prefix="flex-bench-web-") as tmp:
            yield f"sqlite:///{tmp}/bench.sqlite3"


def seed(*, tasks: int, bids: int, devices: int) -> dict[str, str]:
    """Migrate, then one buyer with ``tasks`` mirrored tasks and ``bids`` bids on them from
    ``devices`` enrolled devices, all written with bulk_create; that buyer's session and token.

    The rows are written as chain sync would mirror them (states, budgets, chain ids, one bid
    per device and task) but without a chain: this measures serving pages, not posting
    transactions.
    """
    from datetime import timedelta

    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.utils import timezone
    from eth_account import Account

    from marketplace.models import Bid, Device, Role, Task, TaskOrder, TaskState, Wallet
    from training.spec import TaskSpec

    call_command("migrate", verbosity=0, interactive=False)
    user = get_user_model().objects.create_user(username=BUYER, password=secrets.token_hex(16))
    account = Account.create()
    Wallet.objects.create(user=user, address=account.address, encrypted_key="bench: no key")
    states = [TaskState.BIDDING, TaskState.RUNNING, TaskState.FINALIZED, TaskState.FAILED]
    now = timezone.now()
    rows, orders = [], []
    spec = TaskSpec.from_dict({"model": "digits-mlp", "dataset": "digits-8x8", "rounds": 3})
    for i in range(tasks):
        created_tx = f"0x{i + 1:064x}"
        orders.append(
            TaskOrder(
                buyer=user,
                title=f"bench task {i + 1}",
                spec=spec.as_dict(),
                spec_hash=spec.hash_hex,
                buyer_address=account.address,
                budget_wei=(i + 1) * 10**16,
                min_trainers=1,
                max_trainers=5,
                bidding_ends=now + timedelta(hours=1),
                round_timeout_s=600,
                created_tx=created_tx,
                chain_task_id=i + 1,
                created_at=now - timedelta(minutes=tasks - i),
            )
        )
        rows.append(
            Task(
                chain_task_id=i + 1,
                buyer=user,
                buyer_address=account.address,
                spec_hash=spec.hash_hex,
                state=states[i % len(states)],
                budget_wei=(i + 1) * 10**16,
                rounds=3,
                min_trainers=1,
                max_trainers=5,
                bidding_ends=now + timedelta(hours=1),
                round_timeout_s=600,
                created_tx=created_tx,
                created_block=i + 1,
                created_at=now - timedelta(minutes=tasks - i),
            )
        )
    TaskOrder.objects.bulk_create(orders, batch_size=500)
    tasks_made = Task.objects.bulk_create(rows, batch_size=500)
    addresses = [Account.create().address for _ in range(devices)]
    Device.objects.bulk_create(
        Device(name=f"bench-device-{n}", address=a, device_class="cpu", chain_status="active")
        for n, a in enumerate(addresses)
    )
    per_task = -(-bids // max(tasks, 1))
    if per_task > devices:
        raise SystemExit(f"{bids} bids on {tasks} tasks need at least {per_task} devices")
    made = []
    for i, task in enumerate(tasks_made):
        for j in range(min(per_task, bids - len(made))):
            made.append(
                Bid(
                    task=task,
                    device=addresses[(i * per_task + j) % devices],
                    bid_index=j,
                    role=Role.AGGREGATOR if j == 0 else Role.TRAINER,
                    price_per_round_wei=10**14 + j,
                    samples=100 + j,
                    tx_hash=f"0x{len(made) + 1:064x}",
                    block_number=task.created_block + 1,
                )
            )
    Bid.objects.bulk_create(made, batch_size=2000)
    return signed_in(user)


def analyze() -> None:
    """What autovacuum does soon after a bulk load, done before the load is measured rather
    than during it: the tables vacuumed and the planner's statistics of the rows."""
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")


def signed_in(user) -> dict[str, str]:
    """A session and an API token of ``user``."""
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.sessions.backends.db import SessionStore
    from rest_framework.authtoken.models import Token

    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    token = Token.objects.create(user=user)
    return {"session": session.session_key, "token": token.key}


def seed_task_at_limits(*, rounds: int, bids: int, trainers: int) -> tuple[int, dict[str, str]]:
    """One finished task at the contract's limits, of a buyer of its own: ``bids`` bids,
    ``trainers`` trainers and an aggregator selected, ``rounds`` rounds with every trainer's
    update and both reports, its events and its settlement (bulk_create, no chain); its id,
    and its buyer's session and token."""
    from django.contrib.auth import get_user_model
    from django.utils import timezone
    from eth_account import Account

    from marketplace.models import (
        Bid,
        ChainEventRecord,
        Payout,
        PayoutReason,
        Role,
        Round,
        RoundReport,
        SelectedNode,
        Task,
        TaskState,
        Update,
        UpdateReport,
    )
    from training.spec import TaskSpec

    spec = TaskSpec.from_dict({"model": "digits-mlp", "dataset": "digits-8x8", "rounds": rounds})
    newest = Task.objects.order_by("-chain_task_id").first()
    task_id = (newest.chain_task_id if newest else 0) + 1
    block = (newest.created_block if newest else 0) + 1
    counter = iter(range(1, 10**9))

    def tx() -> str:
        return f"0x{task_id:016x}{next(counter):048x}"

    task = Task.objects.create(
        chain_task_id=task_id,
        buyer=(buyer := get_user_model().objects.create_user(username=BUYER + "-at-limits")),
        buyer_address=Account.create().address,
        spec_hash=spec.hash_hex,
        state=TaskState.FINALIZED,
        budget_wei=10**20,
        rounds=rounds,
        min_trainers=trainers,
        max_trainers=trainers,
        bidding_ends=timezone.now(),
        round_timeout_s=600,
        created_tx=tx(),
        created_block=block,
        published_rounds=rounds + 1,
    )
    devices = [Account.create().address for _ in range(bids)]
    task.aggregator = devices[0]
    task.save(update_fields=["aggregator"])
    events: list[ChainEventRecord] = []

    def event(name: str, row: Any) -> None:
        events.append(
            ChainEventRecord(
                task_id=task_id,
                name=name,
                args={},
                tx_hash=row.tx_hash,
                block_number=row.block_number,
                block_hash="0x" + "ab" * 32,
                log_index=len(events),
            )
        )

    made = Bid.objects.bulk_create(
        Bid(
            task=task,
            device=device,
            bid_index=i,
            role=Role.AGGREGATOR if i == 0 else Role.TRAINER,
            price_per_round_wei=10**14 + i,
            samples=100 + i,
            tx_hash=tx(),
            block_number=(block := block + 1),
        )
        for i, device in enumerate(devices)
    )
    for row in made:
        event("BidPlaced", row)
    chosen = devices[1 : trainers + 1]
    selected_at = (tx(), block := block + 1)
    SelectedNode.objects.bulk_create(
        SelectedNode(
            task=task,
            device=device,
            role=Role.TRAINER if position is not None else Role.AGGREGATOR,
            position=position,
            price_per_round_wei=10**14,
            tx_hash=selected_at[0],
            block_number=selected_at[1],
        )
        for position, device in [(None, devices[0]), *enumerate(chosen)]
    )
    published, updates = [], []
    for number in range(rounds + 1):
        published.append(
            Round(
                task=task,
                number=number,
                global_model_id=f"0x{tx()[2:]}",
                aggregated_mask=str(2**trainers - 1) if number else "0",
                updates_aggregated=trainers if number else 0,
                scores=[1000 + p for p in range(trainers)] if number else [],
                tx_hash=tx(),
                block_number=(block := block + 1),
            )
        )
        if number < rounds:
            updates += [
                Update(
                    task=task,
                    round_number=number,
                    trainer=device,
                    position=position,
                    model_id=f"0x{tx()[2:]}",
                    tx_hash=tx(),
                    block_number=(block := block + 1),
                )
                for position, device in enumerate(chosen)
            ]
    Round.objects.bulk_create(published)
    Update.objects.bulk_create(updates, batch_size=2000)
    RoundReport.objects.bulk_create(
        RoundReport(round=r, model_id=r.global_model_id, tx_hash=r.tx_hash, accuracy=0.9, loss=0.3)
        for r in published
    )
    UpdateReport.objects.bulk_create(
        (
            UpdateReport(update=u, model_id=u.model_id, num_examples=100, loss=0.3, train_s=1.0)
            for u in updates
        ),
        batch_size=2000,
    )
    for row in sorted([*published, *updates], key=lambda r: r.block_number):
        event("UpdateSubmitted" if isinstance(row, Update) else "GlobalModelPublished", row)
    settled = (tx(), block + 1)
    payouts = [
        Payout(
            task=task,
            log_index=i,
            account=device,
            amount_wei=10**15,
            reason=PayoutReason.TRAINER_PAY,
            tx_hash=settled[0],
            block_number=settled[1],
        )
        for i, device in enumerate(chosen)
    ]
    Payout.objects.bulk_create(payouts)
    for row in payouts:
        event("PaymentCredited", row)
    ChainEventRecord.objects.bulk_create(events, batch_size=2000)
    return task_id, signed_in(buyer)


def queries_per_request(
    path: str, headers: dict[str, str], *, task: int, explain: bool = False
) -> dict[str, Any]:
    """The database queries one request for ``path`` makes, counted in this process with
    Django's test client: a warm request (served from the cache) and one right after the
    buyers' tasks and task ``task`` changed (read from the database); with ``explain``, the
    latter's plans on PostgreSQL (EXPLAIN ANALYZE) printed."""
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from marketplace.sync.push import task_push_next
    from marketplace.task_lists import task_lists_changed

    client = Client(headers=headers, SERVER_NAME=HOST)

    def captured() -> list[dict[str, str]]:
        with CaptureQueriesContext(connection) as context:
            response = client.get(path)
        if response.status_code != 200:
            raise RuntimeError(f"{path} answered {response.status_code} in process")
        return context.captured_queries

    client.get(path)
    warm = captured()
    task_lists_changed(buyer_ids=get_user_model().objects.values_list("pk", flat=True))
    with transaction.atomic():
        task_push_next(chain_task_id=task)  # a change of the task, numbered as chain sync does
    changed = captured()
    if explain and connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            for sql in (q["sql"] for q in changed):
                cursor.execute("EXPLAIN ANALYZE " + sql)
                plan = "\n    ".join(row[0] for row in cursor.fetchall())
                print(f"\n{path}: {sql[:300]}\n    {plan}")
    return {
        "queries": len(warm),
        "queries_after_change": len(changed),
        "query_ms_after_change": round(sum(float(q["time"]) for q in changed) * 1000, 2),
    }


def wait_for_port(port: int, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the web server exited with {server.returncode} before serving")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the web server did not listen on {HOST}:{port} within {timeout:.0f} s")


@contextlib.contextmanager
def web_server(env: dict[str, str], port: int, log: Path) -> Iterator[int]:
    """FLEX's web server as the local stack runs it (stack.devstack.web_command); yields its
    process group."""
    with log.open("w") as out:
        server = subprocess.Popen(
            web_command(host=HOST, port=port, quiet=True),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_port(port, server, SERVER_START_TIMEOUT_S)
            yield server.pid
        finally:
            # The whole group: the server's worker processes too.
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user and system) the processes of group ``pgid`` have used (Linux /proc)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # pgrp; then utime and stime, in clock ticks
                ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def served(url: str, headers: dict[str, str], args: argparse.Namespace, server: int) -> dict:
    """drive(), with the server's CPU time per request: on a shared machine the rate depends on
    the other load, the CPU a request costs much less."""
    before = group_cpu_s(server)
    result = drive(url, headers, args)
    sent = result["requests"] + sum(result["failures"].values())
    sent += (WARMUP_REQUESTS // args.concurrency + 1) * args.concurrency
    result["server_cpu_ms_per_request"] = round(1000 * (group_cpu_s(server) - before) / sent, 2)
    return result


def check(url: str, headers: dict[str, str], expected: str) -> str:
    """One request first: a login page or an empty list would make the figures meaningless."""
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read().decode()
    if response.status != 200 or expected not in body:
        raise RuntimeError(f"{url} did not answer as the seeded buyer (no {expected!r})")
    return body


def run(args: argparse.Namespace) -> dict[str, Any]:
    with throwaway_database() as database_url:
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "DJANGO_SETTINGS_MODULE": "flexsite.settings",
            # Production-like: no per-query debug bookkeeping in the server.
            "FLEX_DEBUG": "0",
            "FLEX_LOG_LEVEL": "WARNING",
        }
        os.environ.update({k: env[k] for k in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE")})
        import django

        django.setup()
        from django.db import connections
        from django.urls import reverse

        login = seed(tasks=args.tasks, bids=args.bids, devices=args.devices)
        big, big_login = seed_task_at_limits(**LIMITS)
        analyze()
        page_path, api_path = reverse("task-list"), "/api/tasks/"
        page_headers = {"Cookie": f"sessionid={login['session']}"}
        api_headers = {"Authorization": f"Token {login['token']}"}
        paths = {
            "task_list": (page_path, page_headers),
            "api_tasks": (api_path, api_headers),
            "task_page": (
                reverse("task-detail", args=[big]),
                {"Cookie": f"sessionid={big_login['session']}"},
            ),
            "api_task": (
                f"/api/tasks/{big}/",
                {"Authorization": f"Token {big_login['token']}"},
            ),
        }
        counted = {
            name: queries_per_request(path, headers, task=big, explain=args.explain)
            for name, (path, headers) in paths.items()
        }
        connections.close_all()  # the throwaway database is dropped at the end

        port = free_port()
        base = f"http://{HOST}:{port}"
        log = OUT.parent / "web-server.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with web_server(env, port, log) as server:
            check(base + page_path, page_headers, "bench task")
            listed = check(base + api_path, api_headers, f'"count":{args.tasks}')
            results = {}
            for name, (path, headers) in paths.items():
                size = len(check(base + path, headers, "").encode())
                results[name] = {**served(base + path, headers, args, server), "bytes": size}
    engine = "postgresql" if database_url.startswith("postgres") else "sqlite"
    return {
        **{name: {**results[name], **counted[name]} for name in paths},
        "setup": {
            "server": f"gunicorn x {web_workers()} x {WEB_THREADS} threads",
            "database": engine,
            "tasks": args.tasks,
            "bids": args.bids,
            "devices": args.devices,
            "page": page_path,
            "api": api_path,
            "task_at_limits": {
                **LIMITS,
                "page": paths["task_page"][0],
                "api": paths["api_task"][0],
            },
            "page_size": len(json.loads(listed)["results"]),
        },
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{'target':<10} {'requests':>8} {'rps':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6} "
        f"{'cpu ms':>7} {'queries':>7} {'changed':>7}"
    )
    for name in ("task_list", "api_tasks", "task_page", "api_task"):
        r = result[name]
        failed = sum(r["failures"].values())
        print(
            f"{name:<10} {r['requests']:>8} {r['rps']:>8.1f} {r['p50_ms'] or 0:>8.2f} "
            f"{r['p99_ms'] or 0:>8.2f} {failed:>6} {r['server_cpu_ms_per_request']:>7.2f} "
            f"{r['queries']:>7} {r['queries_after_change']:>7}"
        )
    setup = result["setup"]
    limits = setup["task_at_limits"]
    print(
        f"({setup['tasks']} tasks, {setup['bids']} bids, {setup['database']}, "
        f"{setup['server']}, {result['task_list']['concurrency']} concurrent keep-alive "
        f"connections; task_page and api_task: one task at the contract's limits, "
        f"{limits['bids']} bids, {limits['trainers']} trainers, {limits['rounds']} rounds, "
        f"{result['task_page']['bytes'] // 1000} kB and {result['api_task']['bytes'] // 1000} kB)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.web", description=__doc__)
    parser.add_argument("--tasks", type=int, default=TASKS)
    parser.add_argument("--bids", type=int, default=BIDS)
    parser.add_argument("--devices", type=int, default=DEVICES)
    parser.add_argument(
        "--explain", action="store_true", help="print each counted query's plan (PostgreSQL)"
    )
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--requests", type=int, default=MAX_REQUESTS, help="per target, at most")
    parser.add_argument("--seconds", type=float, default=MAX_SECONDS, help="per target, at most")
    sub = parser.add_subparsers(dest="command")
    driver = sub.add_parser("drive", help="(internal) the load generator process")
    driver.add_argument("url")
    driver.add_argument("--headers", default="{}")
    driver.add_argument("--concurrency", type=int, default=CONCURRENCY)
    driver.add_argument("--requests", type=int, default=MAX_REQUESTS)
    driver.add_argument("--seconds", type=float, default=MAX_SECONDS)
    args = parser.parse_args(argv)
    if args.command == "drive":
        return drive_main(args)

    result = run(args)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {OUT.relative_to(ROOT)}")
    failed = any(sum(result[k]["failures"].values()) for k in TARGET_RPS)
    missed = [
        f"{name} {result[name]['rps']:.0f} req/s (goal {rps}), p99 {result[name]['p99_ms']} ms"
        for name, rps in TARGET_RPS.items()
        if result[name]["rps"] < rps or (result[name]["p99_ms"] or 0) >= TARGET_P99_MS
    ]
    print(f"TARGET MISSED: {'; '.join(missed)}" if missed else "targets met")
    return 1 if failed else verdict(not missed)


if __name__ == "__main__":
    sys.exit(main())
