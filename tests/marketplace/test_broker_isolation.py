"""Each device sees only its own work, on the real RabbitMQ: a device's broker user reads only
its own queue and publishes only its reports; its reports count only for its own work; a
revoked device is cut off at once; messages of another deployment or of no known shape are
refused while the platform's worker keeps serving."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest
import requests
from amqp.exceptions import AccessRefused, ConnectionForced, NotAllowed
from celery.contrib.testing.worker import start_worker
from eth_account.messages import encode_defunct
from kombu import Connection, Consumer, Queue

from chain.events import Role, TaskState
from core.broker import (
    DEFAULT_BROKER_API_URL,
    THROWAWAY,
    BrokerAdmin,
    new_vhost_name,
    queues_consumed,
    url_with,
    vhost_of,
)
from core.messages import (
    Deployment,
    MessageInvalidError,
    RoundReport,
    RoundStep,
    TaskStep,
    UpdateReport,
)
from core.queues import DEFAULT_BROKER_URL, REPORTS_EXCHANGE, REPORTS_QUEUE, route
from flexsite.celery import app as flexsite_app
from flexsite.celery import platform_app
from marketplace import contract, gateway, models, services, tasks
from marketplace.device_broker import device_broker_url
from stack.backing import ROOT, stack_vhost, stack_vhost_delete
from tests.conftest import BrokerVhost, broker_vhost_new
from tests.marketplace.test_consumers import round_0_report
from tests.marketplace.test_lifecycle import (
    WINDOW_S,
    Node,
    advance,
    bid,
    enrol,
    model_id,
    post_task,
    selected_task,
    sync,
)
from worker.app import node_app

pytestmark = pytest.mark.django_db(transaction=True)

REFUSED = (AccessRefused, NotAllowed, ConnectionForced)
WAIT_S = 60


@pytest.fixture(autouse=True)
def platform_app_current() -> Iterator[None]:
    """After each test, the process sends through the platform's app again: a node's app
    (node_app) or a started worker makes itself the process's current and default app, and
    the next test's sync would otherwise send on a broker user its vhost no longer has."""
    yield
    flexsite_app.set_current()
    flexsite_app.set_default()


@pytest.fixture
def vhost(platform_settings) -> Iterator[BrokerVhost]:
    """A vhost of the test's own, where enrolments make their device users."""
    vhost = broker_vhost_new("iso")
    platform_settings.FLEX_BROKER_URL = vhost.url
    yield vhost
    vhost.admin.vhost_delete(vhost.name)


def url_of(node: Node) -> str:
    return device_broker_url(device=node.device)


def publish(
    url: str, body, *, exchange: str = REPORTS_EXCHANGE, routing_key=REPORTS_QUEUE, **options
) -> None:
    """Publish as the user in ``url`` and wait for the broker's answer (a refusal raises)."""
    with Connection(url, transport_options={"confirm_publish": True}) as conn:
        conn.Producer().publish(
            body, exchange=exchange, routing_key=routing_key, declare=[], **options
        )


def platform_send(vhost: BrokerVhost, queue: str, text: str) -> None:
    with Connection(vhost.url) as conn, conn.SimpleQueue(queue) as q:
        q.put({"text": text})


def wait_for(check):
    deadline = time.monotonic() + WAIT_S
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return result


def test_a_device_reads_only_its_own_queue(vhost):
    alice, bob = enrol("alice"), enrol("bob")
    platform_send(vhost, alice.queue, "for alice")
    platform_send(vhost, bob.queue, "for bob")

    with Connection(url_of(alice)) as conn, conn.SimpleQueue(alice.queue) as own:
        assert own.get(timeout=WAIT_S).payload == {"text": "for alice"}
    with Connection(url_of(alice)) as conn, pytest.raises(AccessRefused):
        conn.default_channel.basic_get(bob.queue)
    with Connection(url_of(alice)) as conn, pytest.raises(AccessRefused):
        conn.default_channel.queue_purge(bob.queue)
    # Bob's work is still there, for bob.
    with Connection(url_of(bob)) as conn, conn.SimpleQueue(bob.queue) as own:
        assert own.get(timeout=WAIT_S).payload == {"text": "for bob"}


@pytest.mark.parametrize(
    ("exchange", "routing_key"),
    [
        ("platform", "platform"),  # the platform's own tasks
        ("", "platform"),  # the default exchange reaches every queue by name
        ("device.{bob}", "device.{bob}"),  # another device's work
        ("amq.topic", "#"),
    ],
)
def test_a_device_publishes_nothing_but_its_reports(vhost, exchange, routing_key):
    alice, bob = enrol("alice"), enrol("bob")
    platform_send(vhost, bob.queue, "make the exchanges")
    names = {"bob": bob.device.pk}

    with pytest.raises(AccessRefused):
        publish(
            url_of(alice),
            {"task": "marketplace.task_finalize"},
            exchange=exchange.format(**names),
            routing_key=routing_key.format(**names),
        )
    publish(url_of(alice), {"allowed": "to the reports exchange"})


def test_a_device_reaches_nothing_of_the_platform(vhost, broker):
    alice = enrol("alice")
    config = services.enrolment_config(device=alice.device)

    # What it is handed: its own broker user, no Redis (Channels, locks, results), no admin.
    assert "redis" not in str(config).lower()
    assert config["queues"] == [alice.queue]
    assert config["broker_url"] == url_of(alice)
    parts = urlsplit(config["broker_url"])
    admin = urlsplit(vhost.admin.api_url)
    api = f"{admin.scheme}://{admin.hostname}:{admin.port}"
    overview = requests.get(
        f"{api}/api/overview", auth=(parts.username, parts.password), timeout=30
    )
    assert overview.status_code == 401
    # The same credentials on another vhost (the test session's) are refused.
    with pytest.raises(REFUSED), Connection(url_with(config["broker_url"], vhost=broker.name)) as c:
        c.ensure_connection(max_retries=0)
    # Its worker keeps no results and takes no remote control.
    app = node_app(broker_url=config["broker_url"], queue=alice.queue)
    assert app.conf.result_backend is None
    assert app.conf.worker_enable_remote_control is False
    assert app.conf.task_default_queue == alice.queue


def test_a_revoked_device_is_cut_off_at_once(vhost):
    alice = enrol("alice")
    url = url_of(alice)
    conn = Connection(url)
    consumer = conn.SimpleQueue(alice.queue)  # connected and consuming, as its worker is

    services.device_revoke(device=alice.device)

    with pytest.raises(REFUSED):
        consumer.get(timeout=WAIT_S)
    conn.release()
    with pytest.raises(REFUSED), Connection(url) as again:
        again.ensure_connection(max_retries=0)
    # Approving it again restores the same credentials.
    services.device_approve(device=alice.device)
    with Connection(url) as again:
        again.ensure_connection(max_retries=0)


@contextmanager
def platform_worker_running(vhost: BrokerVhost) -> Iterator[None]:
    """The platform's worker (queue ``platform`` and the reports gateway) in a thread."""
    app = platform_app(broker_url=vhost.url, result_backend=None, set_as_current=False)
    app.conf.worker_hijack_root_logger = False
    with start_worker(app, perform_ping_check=False, shutdown_timeout=60):
        yield


@pytest.fixture
def platform_worker(vhost, caplog) -> Iterator[None]:
    caplog.set_level(logging.INFO)
    with platform_worker_running(vhost):
        yield


def reports_ready(vhost: BrokerVhost) -> int:
    """How many reports wait in the queue ``reports``, not handed to any consumer."""
    with Connection(vhost.url) as conn:
        return conn.default_channel.queue_declare(REPORTS_QUEUE, passive=True).message_count


def round_0_published(market):
    """An aggregator and a trainer selected for a task whose initial model is published."""
    aggregator, trainer = enrol("aggregator", aggregate=True), enrol("trainer")
    task = selected_task(market, aggregator, [trainer])
    initial = model_id("initial")
    published = market.publish_global_model(
        sender=aggregator.account, task_id=task.chain_task_id, round_number=0, model_id=initial
    )
    return aggregator, trainer, task, initial, published


def test_reports_count_only_from_the_device_that_did_the_work(
    vhost, platform_worker, platform_market, caplog
):
    market = platform_market
    aggregator, trainer, task, initial, published = round_0_published(market)
    update = model_id("update")
    submitted = market.submit_update(
        sender=trainer.account, task_id=task.chain_task_id, round_number=0, model_id=update
    )
    sync()
    here = contract.deployment_identity()
    elsewhere = Deployment(chain_id=here.chain_id, contract="0x" + "11" * 20)
    about_round = {
        "task_id": task.chain_task_id,
        "round_number": 0,
        "model_id": initial,
        "tx_hash": published.tx_hash,
    }
    about_update = {
        "task_id": task.chain_task_id,
        "round_number": 0,
        "model_id": update,
        "tx_hash": submitted.tx_hash,
    }

    def signed(report, node: Node) -> dict:
        """``report`` signed with ``node``'s key, whatever device it names."""
        signature = node.account.sign_message(encode_defunct(primitive=report.signed_bytes()))
        return report.model_copy(update={"signature": signature.signature.to_0x_hex()}).dump()

    def round_report(node: Node, *, device: Node, deployment=here, accuracy: float) -> dict:
        report = RoundReport.of(deployment, device=device.address, accuracy=accuracy, **about_round)
        return signed(report, node)

    def update_report(node: Node, *, device: Node, accuracy: float) -> dict:
        report = UpdateReport.of(here, device=device.address, accuracy=accuracy, **about_update)
        return signed(report, node)

    # The trainer speaks for the aggregator; for itself about the aggregator's round, more
    # times than a batch holds; for another deployment; in no known shape. The aggregator
    # speaks for the trainer.
    publish(url_of(trainer), round_report(trainer, device=aggregator, accuracy=0.01))
    claims = gateway.BATCH_MAX + 3
    for claim in range(claims):
        publish(url_of(trainer), round_report(trainer, device=trainer, accuracy=claim / claims))
    publish(
        url_of(aggregator),
        round_report(aggregator, device=aggregator, accuracy=0.03, deployment=elsewhere),
    )
    publish(
        url_of(trainer),
        b"\x00 not json",
        content_type="application/octet-stream",
        content_encoding="binary",
    )
    publish(url_of(trainer), {"kind": "round", "task_id": "all of them"})
    publish(url_of(aggregator), update_report(aggregator, device=trainer, accuracy=0.04))
    # Then each device's own report about its own work.
    publish(url_of(aggregator), round_report(aggregator, device=aggregator, accuracy=0.9))
    publish(url_of(trainer), update_report(trainer, device=trainer, accuracy=0.8))

    row = wait_for(
        lambda: models.RoundReport.objects.filter(
            round__task__chain_task_id=task.chain_task_id, round__number=0, accuracy__isnull=False
        ).first()
    )
    assert row.accuracy == pytest.approx(0.9)
    mine = wait_for(
        lambda: models.UpdateReport.objects.filter(
            update__task__chain_task_id=task.chain_task_id, accuracy__isnull=False
        ).first()
    )
    assert mine.accuracy == pytest.approx(0.8)
    logged = caplog.text
    assert logged.count("report refused (report_signature_invalid)") == 2
    assert logged.count("report refused (message_invalid)") == 2
    assert "dropped a RoundReport message for chain" in logged
    not_yours = f"round report of {trainer.address} refused (report_not_yours)"
    assert wait_for(lambda: caplog.text.count(not_yours) == claims)
    assert market.task(task_id=task.chain_task_id).state == TaskState.RUNNING


def test_reports_a_stopping_worker_had_not_handed_on_are_delivered_again(
    vhost, platform_market, monkeypatch
):
    market = platform_market
    aggregator, _, task, initial, published = round_0_published(market)
    sync()
    report = round_0_report(task, aggregator, published, initial)
    stored = models.RoundReport.objects.filter(round__task__chain_task_id=task.chain_task_id)

    # The gateway takes the report into a batch it would hand on only an hour later, and
    # the worker stops first.
    wait_s = gateway.BATCH_WAIT_S
    monkeypatch.setattr(gateway, "BATCH_WAIT_S", 3600)
    with platform_worker_running(vhost):
        publish(url_of(aggregator), report.dump())
        wait_for(lambda: reports_ready(vhost) == 0)
    assert wait_for(lambda: reports_ready(vhost) == 1)
    assert not stored.exists()

    # The report was never acked: the next worker gets it again and stores it.
    monkeypatch.setattr(gateway, "BATCH_WAIT_S", wait_s)
    with platform_worker_running(vhost):
        row = wait_for(lambda: stored.first())
    assert row.accuracy == pytest.approx(report.accuracy)


def test_platform_steps_for_another_deployment_or_of_no_shape_are_refused(platform_market):
    here = contract.deployment_identity()
    elsewhere = Deployment(chain_id=here.chain_id + 1, contract=here.contract)

    assert tasks.task_abort(message=TaskStep.of(elsewhere, task_id=0).dump()) is None
    with pytest.raises(MessageInvalidError) as exc:
        tasks.task_abort(message={"task_id": 0})
    assert exc.value.code == "message_invalid"
    with pytest.raises(MessageInvalidError):
        tasks.task_finalize(message=TaskStep.of(here, task_id=0).dump() | {"v": 2})
    # A round's reminder: for another deployment dropped, without its round refused, and
    # for a task the mirror does not have, nobody told.
    assert (
        tasks.round_remind(message=RoundStep.of(elsewhere, task_id=0, round_number=1).dump())
        is None
    )
    with pytest.raises(MessageInvalidError):
        tasks.round_remind(message=TaskStep.of(here, task_id=0).dump())
    assert (
        tasks.round_remind(message=RoundStep.of(here, task_id=10**9, round_number=1).dump()) is None
    )


def test_steps_left_in_the_broker_by_another_deployment_are_dropped_and_work_goes_on(
    vhost, platform_market, caplog
):
    """Steps a killed run left in the platform's queue: one for another contract, one for a
    task this chain never had (a chain started afresh, its contract at the same address).
    The worker started afterwards drops both with a warning and acts on the next step."""
    market = platform_market
    here = contract.deployment_identity()
    elsewhere = Deployment(chain_id=here.chain_id, contract="0x" + "22" * 20)
    aggregator, trainer = enrol("aggregator", aggregate=True), enrol("trainer")
    task = post_task(min_trainers=1)
    bid(market, aggregator, task, role=Role.AGGREGATOR)
    bid(market, trainer, task)
    advance(market, WINDOW_S + 1)  # bidding is over: selection is due
    app = platform_app(broker_url=vhost.url, result_backend=None, set_as_current=False)
    app.conf.worker_hijack_root_logger = False
    caplog.set_level(logging.INFO)
    leftovers = [
        TaskStep.of(elsewhere, task_id=task.chain_task_id),
        TaskStep.of(here, task_id=market.task_count() + 1000),
    ]
    for step in leftovers:
        app.send_task(
            "marketplace.task_select_nodes", kwargs={"message": step.dump()}, **route("platform")
        )
    assert market.task(task_id=task.chain_task_id).state == TaskState.BIDDING

    # The worker's start configures logging anew (Django's LOGGING) and drops the root
    # logger's handlers: listen on the loggers that speak here.
    speakers = [logging.getLogger(name) for name in ("marketplace.tasks", "core.messages")]
    for logger in speakers:
        logger.addHandler(caplog.handler)
    try:
        with start_worker(app, perform_ping_check=False, shutdown_timeout=60):
            wait_for(lambda: "a job left by an earlier run" in caplog.text)
            wait_for(lambda: "dropped a TaskStep message for chain" in caplog.text)
            assert market.task(task_id=task.chain_task_id).state == TaskState.BIDDING
            # The same step for this deployment's task is acted on.
            app.send_task(
                "marketplace.task_select_nodes",
                kwargs={"message": TaskStep.of(here, task_id=task.chain_task_id).dump()},
                **route("platform"),
            )
            wait_for(lambda: market.task(task_id=task.chain_task_id).state == TaskState.RUNNING)
    finally:
        for logger in speakers:
            logger.removeHandler(caplog.handler)


def test_each_stack_has_a_namespace_of_its_own(tmp_path):
    """A message left by one stack (a killed run) is never seen by another; a stack that
    starts again finds its own."""
    first, second = tmp_path / "first", tmp_path / "second"
    try:
        url = stack_vhost(first)["FLEX_BROKER_URL"]
        with Connection(url) as conn, conn.SimpleQueue("platform") as queue:
            queue.put({"left": "behind"})
        other = stack_vhost(second)["FLEX_BROKER_URL"]

        assert vhost_of(other) != vhost_of(url)
        with Connection(other) as conn, conn.SimpleQueue("platform") as queue:
            assert queue.qsize() == 0
        assert stack_vhost(first)["FLEX_BROKER_URL"] == url
        with Connection(url) as conn, conn.SimpleQueue("platform") as queue:
            assert queue.get(timeout=WAIT_S).payload == {"left": "behind"}
    finally:
        stack_vhost_delete(first)
        stack_vhost_delete(second)


def test_a_queue_counts_as_consumed_as_soon_as_a_worker_listens_on_it(vhost):
    """What the stack waits on before it posts work: asked over AMQP, the broker's answer
    is current (its management API's count would still say none for up to five seconds)."""
    assert not queues_consumed(vhost.url, ["platform"])  # not declared yet
    with Connection(vhost.url) as conn, conn.SimpleQueue("platform"), conn.SimpleQueue("other"):
        assert not queues_consumed(vhost.url, ["platform"])  # declared, nobody listening
        with Consumer(conn.channel(), queues=[Queue("platform")], callbacks=[]):
            assert queues_consumed(vhost.url, ["platform"])
            assert not queues_consumed(vhost.url, ["platform", "other"])
            assert not queues_consumed(vhost.url, ["platform", "missing"])
        assert not queues_consumed(vhost.url, ["platform"])


# A throwaway vhost made by a process that then ends without deleting it: a killed run.
# A throwaway run that leaves a device user and a queued message behind, then dies. The
# message is queued while the run is alive: once it has exited, any stack starting in another
# test process may sweep its vhost.
ORPHAN = """
import sys
from kombu import Connection
from core.broker import BrokerAdmin, url_with
admin = BrokerAdmin(sys.argv[2])
admin.vhost_create(sys.argv[1], throwaway=True)
admin.user_grant(user=sys.argv[1] + ".device-1", password="x", vhost=sys.argv[1],
                 permissions={"configure": "", "write": "", "read": ""})
with Connection(url_with(sys.argv[3], vhost=sys.argv[1])) as conn:
    with conn.SimpleQueue("platform") as queue:
        queue.put({"left": "behind"})
"""


def test_what_a_killed_throwaway_run_left_is_swept_and_nothing_else(tmp_path):
    admin = BrokerAdmin(os.environ.get("FLEX_BROKER_API_URL", DEFAULT_BROKER_API_URL))
    orphan, live, elsewhere = (new_vhost_name("flex-sweep-") for _ in range(3))
    persistent = tmp_path / "make-run"
    try:
        broker = os.environ.get("FLEX_BROKER_URL", DEFAULT_BROKER_URL)
        subprocess.run(
            [sys.executable, "-c", ORPHAN, orphan, admin.api_url, broker], cwd=ROOT, check=True
        )
        admin.vhost_create(live, throwaway=True)  # this process: alive
        admin.vhost_create(elsewhere)
        admin._call(  # another host's throwaway vhost, its owner unknown here
            "PUT", f"vhosts/{elsewhere}", json={"description": f"{THROWAWAY} other-host 1"}
        )
        kept = vhost_of(stack_vhost(persistent)["FLEX_BROKER_URL"])  # make run's: not throwaway

        swept = admin.sweep_throwaway()

        # Another test process may sweep the orphan first (every stack sweeps as it starts),
        # so what counts is that it is gone once this sweep returns, and nothing else is.
        assert not admin.vhost_exists(orphan)
        assert not set(swept) & {live, elsewhere, kept}
        users = [u["name"] for u in admin._call("GET", "users").json()]
        assert f"{orphan}.device-1" not in users
        assert all(admin.vhost_exists(v) for v in (live, elsewhere, kept))
    finally:
        for name in (orphan, live, elsewhere):
            admin.vhost_delete(name)
        stack_vhost_delete(persistent)
