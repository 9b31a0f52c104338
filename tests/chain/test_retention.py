"""A node's store lets go of a settled task's models once they have been kept long enough,
against the real chain: never a task that is running or in its dispute windows, never
another deployment's models, and never the final model its buyer downloads from the
aggregator."""

from __future__ import annotations

import time

import numpy as np
import pytest

from chain.client import FlexMarket
from chain.enums import TaskState
from chain.node import chain_id
from tests.blobs import blob_of
from tests.chain.conftest import Accounts, Clock, Flow, Running
from training.serialize import Kind
from training.store import ModelStore
from worker.retention import prune

DAY = 86_400


def hold(store: ModelStore, market: FlexMarket, running: Running, *, trainer: str) -> set[bytes]:
    """What a node of ``running`` holds: each global model and ``trainer``'s update of each
    round, as the node stored them."""
    ids = set()
    deployment = {"chain_id": chain_id(market.w3), "contract": market.address}
    for number in range(running.rounds + 1):
        header = {**deployment, "task_id": running.task_id, "round_number": number}
        weights = [np.full((3, 2), running.task_id + number / 10, dtype=np.float32)]
        ids.add(store.put(blob_of(weights, kind=Kind.GLOBAL, **header)))
        if number < running.rounds:
            ids.add(store.put(blob_of(weights, kind=Kind.UPDATE, trainer=trainer, **header)))
    return ids


def finish(flow: Flow, running: Running) -> None:
    for number in range(running.rounds):
        flow.run_round(running, number)


@pytest.fixture
def tasks(flow: Flow, market: FlexMarket, accounts: Accounts, clock: Clock) -> dict[str, Running]:
    """A task of each kind a store meets: running, trained (its dispute windows open),
    finalized and aborted (its aggregator missed a deadline)."""
    running = flow.start(rounds=2)
    trained = flow.start(rounds=2, dispute_window=7 * DAY)
    finish(flow, trained)
    finalized = flow.start(rounds=2)
    finish(flow, finalized)
    market.finalize(sender=accounts.outsider, task_id=finalized.task_id)
    aborted = flow.start(rounds=2)
    flow.run_round(aborted, 0)
    clock.mine_at(market.task(task_id=aborted.task_id).publish_deadline + 1)
    market.abort(sender=accounts.outsider, task_id=aborted.task_id)
    found = {"running": running, "trained": trained, "finalized": finalized, "aborted": aborted}
    for name, task in found.items():
        assert market.task(task_id=task.task_id).state == TaskState[name.upper()]
    return found


def test_a_trainer_lets_go_of_settled_tasks_after_the_keep_period_and_of_nothing_else(
    tmp_path, market: FlexMarket, tasks: dict[str, Running]
):
    store = ModelStore(tmp_path)
    trainer = tasks["running"].trainers[0].address
    held = {name: hold(store, market, t, trainer=trainer) for name, t in tasks.items()}
    # The same task IDs under another deployment: not this market's to judge.
    elsewhere = {
        store.put(blob_of([np.ones((2,))], task_id=t.task_id, contract="0x" + "ee" * 20))
        for t in tasks.values()
    }
    sizes = {m: store.info(m).size for ids in held.values() for m in ids}

    assert prune(store=store, market=market, node=trainer, keep_s=DAY) == []
    later = time.time() + DAY + 1
    pruned = prune(store=store, market=market, node=trainer, keep_s=DAY, now=later)

    settled = ("finalized", "aborted")
    assert {(p.task_id, p.state, p.models, p.freed_bytes) for p in pruned} == {
        (
            tasks[name].task_id,
            TaskState[name.upper()],
            len(held[name]),
            sum(sizes[m] for m in held[name]),
        )
        for name in settled
    }
    for name, ids in held.items():
        gone = name in settled
        assert all(store.has(m) != gone for m in ids), name
        listed = store.list(contract=market.address, task_id=tasks[name].task_id)
        assert {m.model_id for m in listed} == (set() if gone else ids), name
    assert all(store.has(m) for m in elsewhere)
    # Done once: a second look finds nothing more to delete.
    assert prune(store=store, market=market, node=trainer, keep_s=DAY, now=later) == []


def test_the_aggregator_keeps_the_final_model_its_buyer_downloads(
    tmp_path, market: FlexMarket, tasks: dict[str, Running]
):
    store = ModelStore(tmp_path)
    finalized, aborted = tasks["finalized"], tasks["aborted"]
    aggregator = finalized.aggregator.address
    trainer = finalized.trainers[0].address
    held = {t.task_id: hold(store, market, t, trainer=trainer) for t in (finalized, aborted)}

    prune(store=store, market=market, node=aggregator, keep_s=0)

    [final] = store.list(task_id=finalized.task_id)
    assert (final.kind, final.round_number) == ("global", finalized.rounds)
    assert final.model_id in held[finalized.task_id]
    assert store.has(final.model_id)
    assert store.list(task_id=aborted.task_id) == []


def test_models_under_dispute_stay_however_old(
    tmp_path, market: FlexMarket, clock: Clock, tasks: dict[str, Running]
):
    """A trained task's windows are open: its aggregator must still serve chunks and its
    trainers may still need their updates to prove a wrong aggregate. Nothing goes, even
    with no keep period, the chain six days on and the node's clock sixty."""
    store = ModelStore(tmp_path)
    trained = tasks["trained"]
    ids = hold(store, market, trained, trainer=trained.trainers[0].address)
    clock.advance(6 * DAY)
    for node in (trained.aggregator.address, trained.trainers[0].address):
        assert (
            prune(store=store, market=market, node=node, keep_s=0, now=time.time() + 60 * DAY) == []
        )
    assert all(store.has(m) for m in ids)
