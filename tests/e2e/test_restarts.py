"""Restarts in the middle of a task: the whole platform as separate processes runs one task,
and in six successive rounds, while the trainers train, one part of it is killed and started
again: the web server (with the buyer's live page open), beat, the platform worker, the broker,
the database's connections, and the chain node (Anvil, from its state file). The task still
finalizes; no step ran twice, nothing was paid twice, escrow is conserved to the wei, the mirror
equals one rebuilt from the chain alone, and the page reconnected and caught up.

The broker and Redis here are private ones the test starts (stack.backing), never the machine's
shared servers; the database is a PostgreSQL database of the test's own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from chain.client import FlexMarket
from chain.events import (
    BidPlaced,
    CreditReason,
    GlobalModelPublished,
    NodesSelected,
    PaymentCredited,
    TaskFinalized,
    TaskState,
    UpdateSubmitted,
)
from chain.launcher import free_port
from chain.node import connect
from core.broker import queues_consumed
from core.queues import PLATFORM_QUEUE
from stack.backing import LocalRabbitMQ, local_redis
from stack.demo import DEMO_SPEC
from stack.devstack import LOCAL_DEVICES, stack
from tests.e2e import BIDDING_WINDOW_S, DISPUTE_WINDOW_S
from tests.postgres import new_database, terminate_connections

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TRAINERS = 2
DEVICES = LOCAL_DEVICES[: TRAINERS + 1]  # the aggregator and two trainers
# One restart per round, each while that round's trainers train.
RESTARTS = ("web", "beat", "platform", "broker", "database", "chain")
ROUNDS = len(RESTARTS)
BUDGET_WEI = 10**17
# Generous: a restart must delay a round, not close it. Time is waited for, never asserted.
ROUND_TIMEOUT_S = 300
TASK_TIMEOUT_S = 1500
PAGE_TIMEOUT_MS = 240_000

# The mirror as chain sync writes it, without what only says when a row was written.
MIRROR_DUMP = """
import contextlib
import json
from marketplace import models as m
# Which website account bought a task is the platform's own record, not the chain's.
skip = {"id", "created_at", "updated_at", "seen_at", "synced_at", "buyer_id", "last_lag_ms"}
def rows(model):
    out = []
    for row in model.objects.all().values():
        if "task_id" in row and model is not m.ChainEventRecord:
            row["task_id"] = m.Task.objects.get(pk=row["task_id"]).chain_task_id
        out.append({k: json.dumps(v, sort_keys=True, default=str) for k, v in sorted(row.items())
                    if k not in skip})
    return sorted(out, key=json.dumps)
names = ["Task", "Bid", "SelectedNode", "Round", "Update", "Payout", "ChainEventRecord"]
print(json.dumps({n: rows(getattr(m, n)) for n in names}))
"""


@pytest.fixture
def database() -> Iterator[str]:
    with new_database() as url:
        yield url


@pytest.fixture
def broker() -> Iterator[LocalRabbitMQ]:
    node = LocalRabbitMQ().start()
    yield node
    node.remove()


@pytest.fixture
def platform(tmp_path, monkeypatch, database, broker) -> Iterator[dict]:
    """The local stack with three devices, on the private broker, Redis and database."""
    with local_redis() as redis_url:
        for key, value in {
            "DATABASE_URL": database,
            "REDIS_URL": redis_url,
            "FLEX_BROKER_URL": broker.url,
            "FLEX_BROKER_API_URL": broker.api_url,
            "FLEX_WEB_PORT": str(free_port()),
            "FLEX_CHAIN_PORT": str(free_port()),
            "FLEX_SYNC_INTERVAL_S": "0.5",
        }.items():
            monkeypatch.setenv(key, value)
        var = tmp_path / "var"
        with stack(var=var, quiet_web=True, devices=DEVICES, ephemeral=True) as up:
            deployment = json.loads((var / "chain" / "deployment.json").read_text())
            up["market"] = FlexMarket(
                w3=connect(up["env"]["ETH_RPC_URL"]),
                address=deployment["address"],
                deploy_block=deployment["block"],
            )
            up["var"] = var
            up["broker"] = broker
            up["queues"] = [
                PLATFORM_QUEUE,
                *(
                    json.loads((h / "device.json").read_text())["queues"][0]
                    for h in up["homes"].values()
                ),
            ]
            yield up


def api_session(up: dict) -> requests.Session:
    buyer = up["buyer"]
    session = requests.Session()
    answer = session.post(
        up["web_url"] + "/api/auth/token/",
        json={"username": buyer["username"], "password": buyer["password"]},
        timeout=60,
    )
    answer.raise_for_status()
    session.headers["Authorization"] = f"Token {answer.json()['token']}"
    return session


def live_page(browser, up: dict, task_id: int):
    """The buyer's task page, logged in, its socket open."""
    page = browser.new_context().new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(up["web_url"] + "/login/")
    page.fill("#id_username", up["buyer"]["username"])
    page.fill("#id_password", up["buyer"]["password"])
    page.locator("form button[type=submit]").click()
    page.wait_for_load_state()
    page.goto(up["web_url"] + f"/tasks/{task_id}/")
    page.wait_for_selector("#live.on")
    return page


def wait_until(what: str, check, *, timeout: float, up: dict):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        dead = up["supervisor"].dead()
        assert not dead, f"{', '.join(dead)} exited while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)
    return found


def recovered(up: dict) -> bool:
    """Every part answers again: the web server, the chain, and a consumer on every queue."""
    try:
        if up["market"].w3.eth.block_number < 1:
            return False
        if requests.get(up["web_url"] + "/", timeout=10).status_code >= 500:
            return False
        return queues_consumed(up["env"]["FLEX_BROKER_URL"], up["queues"])
    except Exception:  # still coming back
        return False


def task_state(market: FlexMarket, task_id: int):
    try:
        return market.task(task_id=task_id)
    except Exception:  # the node is down for its restart: look again
        return None


def mirror_dump(up: dict, database_url: str) -> dict:
    env = {**up["env"], "DATABASE_URL": database_url}
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", MIRROR_DUMP],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def mirror_rebuilt(up: dict) -> dict:
    """The mirror from nothing but the chain: a fresh database, migrated, synced once."""
    with new_database() as url:
        env = {**up["env"], "DATABASE_URL": url}
        for command in (["migrate", "--no-input", "-v", "0"], ["sync_chain"]):
            subprocess.run(
                [sys.executable, "manage.py", *command], cwd=ROOT, env=env, check=True, timeout=600
            )
        return mirror_dump(up, url)


def mirror_differences(kept: dict, rebuilt: dict) -> list[tuple[str, dict, dict]]:
    """Each model's rows that differ between two mirror dumps, field by field."""
    found = []
    for model in sorted(set(kept) | set(rebuilt)):
        a, b = kept.get(model, []), rebuilt.get(model, [])
        if len(a) != len(b):
            found.append((model, {"rows": len(a)}, {"rows": len(b)}))
            continue
        for x, y in zip(a, b, strict=True):
            if x != y:
                keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
                found.append((model, {k: x.get(k) for k in keys}, {k: y.get(k) for k in keys}))
    return found


@pytest.mark.timeout(TASK_TIMEOUT_S + 600)
def test_task_survives_a_restart_of_each_part_mid_round(platform, browser, tmp_path):
    up, market = platform, platform["market"]
    sup = up["supervisor"]
    api = api_session(up)
    created = api.post(
        up["web_url"] + "/api/tasks/create/",
        json={
            "title": "restarts",
            "spec": {**DEMO_SPEC, "local_epochs": 1, "rounds": ROUNDS},
            "budget_wei": str(BUDGET_WEI),
            "min_trainers": TRAINERS,
            "max_trainers": TRAINERS,
            "bidding_window_s": BIDDING_WINDOW_S,
            "round_timeout_s": ROUND_TIMEOUT_S,
            "dispute_window_s": DISPUTE_WINDOW_S,
        },
        timeout=120,
    )
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]
    page = live_page(browser, up, task_id)

    for published, part in enumerate(RESTARTS, start=1):
        # Global model ``published - 1`` is out: its round's trainers are training now.
        wait_until(
            f"round {published - 1} to open",
            lambda n=published: (t := task_state(market, task_id)) and t.published_rounds >= n,
            timeout=TASK_TIMEOUT_S,
            up=up,
        )
        if part == "web":
            for server in ("web", "live"):  # the pages' server and the sockets' one
                sup.stop(server, timeout=0)  # SIGKILL at once
            page.wait_for_selector("#live.off")  # the page saw its socket go
            for server in ("web", "live"):
                sup.start(server, sup.commands[server][0])
            page.wait_for_selector("#live.on")  # and reconnected by itself
        elif part in ("beat", "platform"):
            sup.restart(part, timeout=0)  # killed, not asked to stop
        elif part == "broker":
            up["broker"].restart()
        elif part == "database":
            assert terminate_connections(up["env"]["DATABASE_URL"]) > 0
        elif part == "chain":
            # SIGTERM: Anvil dumps its state file on the way out and loads it again.
            sup.restart("chain")
        # One restart at a time: the next waits until every part answers again.
        wait_until(
            f"the platform to recover from the {part} restart",
            lambda: recovered(up),
            timeout=600,
            up=up,
        )

    settled = {TaskState.FINALIZED, TaskState.ABORTED, TaskState.FAILED, TaskState.CANCELLED}
    info = wait_until(
        "the task to settle",
        lambda: (t := task_state(market, task_id)) and t.state in settled and t,
        timeout=TASK_TIMEOUT_S,
        up=up,
    )
    assert info.state == TaskState.FINALIZED
    head = market.w3.eth.block_number
    events = [
        e
        for chunk in market.scan(to_block=head)
        for e in chunk.events
        if getattr(e, "task_id", None) == task_id
    ]

    def of(kind):
        return [e for e in events if isinstance(e, kind)]

    # Each step happened once.
    assert len(of(NodesSelected)) == 1
    assert len(of(TaskFinalized)) == 1
    assert sorted(e.round for e in of(GlobalModelPublished)) == list(range(ROUNDS + 1))
    submitted = Counter((e.round, e.trainer) for e in of(UpdateSubmitted))
    assert set(submitted.values()) == {1}
    # Nobody was paid twice, and the budget and the deposits are all accounted for, to the
    # wei: pay, refund, deposits returned and slashed.
    credits = Counter((e.account, e.reason) for e in of(PaymentCredited))
    assert set(credits.values()) == {1}
    [final] = of(TaskFinalized)
    paid = sum(e.amount_wei for e in of(PaymentCredited))
    deposits = sum(e.deposit_wei for e in of(BidPlaced))
    assert paid == BUDGET_WEI + deposits
    assert final.trainers_paid_wei + final.aggregator_paid_wei + final.refunded_wei == BUDGET_WEI
    assert sum(e.amount_wei for e in of(PaymentCredited) if e.reason == CreditReason.REFUND) == (
        final.refunded_wei
    )
    assert info.published_rounds == ROUNDS + 1

    # The mirror, through every restart, equals one rebuilt from the chain alone.
    wait_until(
        "the mirror to reach the chain's head",
        lambda: (
            (mirror := mirror_dump(up, up["env"]["DATABASE_URL"]))
            and any(json.loads(t["state"]) == "finalized" for t in mirror["Task"])
            and max(int(e["block_number"]) for e in mirror["ChainEventRecord"]) >= head
        ),
        timeout=600,
        up=up,
    )
    # The buyer's page, reconnected after the web server's restart, caught up to the end: the
    # mirror's finalization reaches it by the live push (or, had the socket dropped, by the
    # snapshot it is sent on reconnecting).
    page.wait_for_function("document.getElementById('task-state').dataset.state === 'finalized'")
    kept, rebuilt = mirror_dump(up, up["env"]["DATABASE_URL"]), mirror_rebuilt(up)
    differences = mirror_differences(kept, rebuilt)
    assert not differences, json.dumps(differences[:6], indent=1)
