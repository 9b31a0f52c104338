"""Devices' reports that come before chain sync has mirrored their work: parked, stored by
the sync as it commits that work, never polled for, and only ever from the device that did
the work."""

from __future__ import annotations

import dataclasses

import pytest
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext

from core.messages import RoundReport, UpdateReport
from marketplace import contract, reports
from marketplace.models import Round, Task, Update
from marketplace.tasks import reports_record
from tests.marketplace.test_lifecycle import enrol, model_id, selected_task, sync
from tests.marketplace.test_sync import mirror_env  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)


def test_reports_that_come_before_chain_sync_are_stored_when_it_mirrors_their_work(
    platform_market,
    mirror_env,  # noqa: F811
):
    market = platform_market
    here = contract.deployment_identity()
    aggregator = enrol("early-aggregator", aggregate=True)
    ann, ben = enrol("early-ann"), enrol("early-ben")
    order = selected_task(market, aggregator, [ann, ben])
    sync()
    task_id = order.chain_task_id

    initial = model_id("initial")
    published = market.publish_global_model(
        sender=aggregator.account,
        task_id=task_id,
        round_number=0,
        model_id=initial,
        aggregated_mask=0,
    )

    def signed(kind, node, model: str, tx, round_number: int = 0, **measures) -> dict:
        """``node``'s report of ``kind`` on ``model`` of ``round_number``, mined in ``tx``."""
        fields = {
            "task_id": task_id,
            "round_number": round_number,
            "model_id": model,
            "tx_hash": tx.tx_hash,
        }
        report = kind.of(here, device=node.address, **fields, **measures)
        return report.sign(node.account).dump()

    def round_report(node, round_number: int = 0, **measures) -> dict:
        return signed(RoundReport, node, initial, published, round_number, **measures)

    # Before the sync has the round: a trainer's report on it is refused (the selection is
    # mirrored: the round is not its to report on); the aggregator's own, in the same batch,
    # is parked, and the task does not raise, so it is not retried.
    early = [
        round_report(ann, accuracy=0.99, loss=0.01),
        round_report(aggregator, accuracy=0.1, loss=2.3),
    ]
    assert reports_record(messages=early) == {"report_not_yours": 1, "waiting": 1}
    assert not Round.objects.filter(task__chain_task_id=task_id).exists()

    sync()
    row = Round.objects.get(task__chain_task_id=task_id, number=0)
    assert (row.metrics.accuracy, row.metrics.loss) == (0.1, 2.3)

    def submit(node, label: str):
        update = model_id(label)
        tx = market.submit_update(
            sender=node.account, task_id=task_id, round_number=0, model_id=update
        )
        return update, tx

    def update_report(node, update: str, tx, round_number: int = 0, **measures) -> dict:
        return signed(UpdateReport, node, update, tx, round_number, **measures)

    ann_update, ann_tx = submit(ann, "ann-0")
    # Ben reports on an update that is not the one the chain has from him.
    ben_update, ben_tx = submit(ben, "ben-0")
    early = [
        update_report(ann, ann_update, ann_tx, num_examples=120, train_s=0.25),
        update_report(ben, model_id("ben-other"), ben_tx, num_examples=10**6),
    ]
    assert reports_record(messages=early) == {"waiting": 2}
    assert not Update.objects.filter(task__chain_task_id=task_id).exists()

    sync()
    updates = {u.trainer: u for u in Update.objects.filter(task__chain_task_id=task_id)}
    assert (updates[ann.address].report.num_examples, updates[ann.address].report.train_s) == (
        120,
        0.25,
    )
    assert not hasattr(updates[ben.address], "report")
    # Nothing is left waiting, Ben's refused report included.
    work = [("update", task_id, 0, n.address) for n in (ann, ben)]
    work.append(("round", task_id, 0, aggregator.address))
    assert not cache.get_many([reports.parked_key(w) for w in work])

    # Once mirrored, a report is stored at once, as it comes; one that names other work than
    # the chain has is dropped, and the stored one stands.
    late = [
        update_report(ben, ben_update, ben_tx, num_examples=80),
        update_report(ann, model_id("ann-other"), ann_tx, num_examples=10**6),
    ]
    assert reports_record(messages=late) == {"stored": 1, "dropped": 1}
    assert Update.objects.get(pk=updates[ben.address].pk).report.num_examples == 80
    assert Update.objects.get(pk=updates[ann.address].pk).report.num_examples == 120

    # Only work a device may yet do can wait for the sync, so no device can fill Redis with
    # reports on work that never comes: not a device the task did not select, not a round
    # the task does not have, not a trainer's report as the aggregator's. A batch of them
    # costs the honest report among them nothing: the aggregator's report on the task's last
    # global model, still to come, waits for it.
    outsider = enrol("early-outsider")
    rounds = Task.objects.get(chain_task_id=task_id).rounds
    batch = [
        update_report(outsider, model_id("out-0"), ann_tx),
        update_report(ann, model_id("ann-far"), ann_tx, rounds),
        round_report(aggregator, rounds, accuracy=0.5),
        update_report(aggregator, model_id("agg-0"), ann_tx),
        round_report(aggregator, rounds + 1),
    ]
    assert reports_record(messages=batch) == {"report_unexpected": 4, "waiting": 1}
    work = [
        ("update", task_id, 0, outsider.address),
        ("update", task_id, rounds, ann.address),
        ("update", task_id, 0, aggregator.address),
        ("round", task_id, rounds + 1, aggregator.address),
    ]
    assert not cache.get_many([reports.parked_key(w) for w in work])
    assert cache.get(reports.parked_key(("round", task_id, rounds, aggregator.address)))


def test_a_rounds_update_reports_are_stored_in_the_same_few_queries_however_many(
    platform_market,
    mirror_env,  # noqa: F811
):
    """A round brings one report per trainer, stored as the sync commits the round's
    updates: the queries do not grow with them. A report sent twice in one batch (a replay)
    is stored once, the last; one on another's update or not yet mirrored stores nothing."""
    market = platform_market
    aggregator = enrol("many-aggregator", aggregate=True)
    trainers = [enrol(f"many-{k}") for k in range(2)]
    order = selected_task(market, aggregator, trainers)
    task_id = order.chain_task_id
    market.publish_global_model(
        sender=aggregator.account, task_id=task_id, round_number=0, model_id=model_id("g")
    )
    submitted = {}
    for k, node in enumerate(trainers):
        update = model_id(f"many-{k}")
        tx = market.submit_update(
            sender=node.account, task_id=task_id, round_number=0, model_id=update
        )
        submitted[node.address] = (update, tx.tx_hash)
    sync()

    def metrics(node, **measures) -> reports.UpdateMetrics:
        update, tx_hash = submitted[node.address]
        fields = {"task_id": task_id, "round_number": 0, "model_id": update, "tx_hash": tx_hash}
        return reports.UpdateMetrics(trainer=node.address, **fields, **measures)

    with CaptureQueriesContext(connection) as one:
        reports.update_metrics_record_all([metrics(trainers[0], num_examples=1)])
    batch = [metrics(node, num_examples=10 + k) for k, node in enumerate(trainers)]
    batch.append(metrics(trainers[1], num_examples=99))  # the same report again, changed
    batch.append(dataclasses.replace(metrics(trainers[1]), trainer=trainers[0].address))
    batch.append(dataclasses.replace(metrics(trainers[0]), round_number=1))
    with CaptureQueriesContext(connection) as many:
        found = reports.update_metrics_record_all(batch)
    assert len(many.captured_queries) == len(one.captured_queries)
    assert found[3] is None
    assert isinstance(found[4], reports.UpdateNotMirroredError)
    stored = {
        u.trainer: u.report.num_examples
        for u in Update.objects.filter(task__chain_task_id=task_id).select_related("report")
    }
    assert stored == {trainers[0].address: 10, trainers[1].address: 99}
