"""What an aggregator holds against copied updates: every global model so far and every
earlier round's update of the task, however many rounds in, read from its own store once."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from eth_utils import to_checksum_address

from tests import blobs
from training.scoring import values_digest
from training.serialize import Kind, decode, id_hex
from training.store import ModelStore
from worker import aggregator

ALICE, BOB = "0x" + "a1" * 20, "0x" + "b0" * 20


@pytest.fixture
def node(tmp_path, monkeypatch):
    # A process of its own: nothing remembered from another test's task.
    monkeypatch.setattr(aggregator, "_KNOWN", {})
    config = SimpleNamespace(chain_id=blobs.CHAIN_ID, contract_address=blobs.CONTRACT.upper())
    return SimpleNamespace(config=config, store=ModelStore(tmp_path / "store"))


def _put(node, seed: int, **header) -> str:
    values = [np.random.default_rng(seed).integers(-1000, 1000, (4, 3), dtype=np.int32)]
    return id_hex(node.store.put(blobs.blob_of(values, **header)))


def _digest(node, model_id: str) -> bytes:
    return values_digest(decode(node.store.get(model_id)).values)


def _round(node, number: int) -> dict[str, str]:
    """Round ``number`` as an aggregator's store sees it: the global model it opened with and
    the two updates handed in; their IDs by name."""
    return {
        "global": _put(node, 100 + number, kind=Kind.GLOBAL, round_number=number),
        "alice": _put(node, 200 + number, round_number=number, trainer=ALICE),
        "bob": _put(node, 300 + number, round_number=number, trainer=BOB),
    }


def test_every_earlier_update_and_every_global_model_is_known_in_each_later_round(node):
    rounds = []
    for number in range(4):
        rounds.append(_round(node, number))
        names, ids = aggregator._known_models(node, task_id=1, round_number=number)

        # This round's own updates are the candidates, not what they may not copy.
        expected = {rounds[number]["global"]: f"round {number}'s global model"}
        for earlier in range(number):
            expected[rounds[earlier]["global"]] = f"round {earlier}'s global model"
            for who, address in (("alice", ALICE), ("bob", BOB)):
                named = f"round {earlier}'s {to_checksum_address(address)}'s update"
                expected[rounds[earlier][who]] = named
        assert names == {_digest(node, i): name for i, name in expected.items()}
        assert ids == {_digest(node, i): i for i in expected}


def test_a_restarted_aggregator_and_a_retried_round_know_the_same(node, monkeypatch):
    for number in range(3):
        _round(node, number)
        aggregator._known_models(node, task_id=1, round_number=number)
    later = aggregator._known_models(node, task_id=1, round_number=2)
    # The same round asked for again (a retried aggregation) adds nothing twice...
    assert len(later[0]) == 3 + 2 * 2
    # ... and a new process, which starts from its store alone, finds what the old one had.
    monkeypatch.setattr(aggregator, "_KNOWN", {})
    assert aggregator._known_models(node, task_id=1, round_number=2) == later
    # An earlier round asked for after a later one sees only what came before it.
    earlier = aggregator._known_models(node, task_id=1, round_number=1)
    assert len(earlier[0]) == 2 + 2


def test_another_tasks_models_are_not_held_against_this_one(node):
    _put(node, 1, kind=Kind.GLOBAL, round_number=0, task_id=2)
    _put(node, 2, round_number=0, task_id=2, trainer=ALICE)
    mine = _put(node, 3, kind=Kind.GLOBAL, round_number=0)

    names, _ = aggregator._known_models(node, task_id=1, round_number=1)

    assert names == {_digest(node, mine): "round 0's global model"}


def test_only_the_tasks_aggregated_most_recently_are_kept_and_a_dropped_one_is_read_again(
    node, monkeypatch
):
    monkeypatch.setattr(aggregator, "KNOWN_TASKS", 2)
    for task_id in (1, 2, 3):
        _put(node, 10 * task_id, kind=Kind.GLOBAL, round_number=0, task_id=task_id)
        _put(node, 10 * task_id + 1, round_number=0, task_id=task_id, trainer=ALICE)
    first = {t: aggregator._known_models(node, task_id=t, round_number=1) for t in (1, 2)}
    aggregator._known_models(node, task_id=1, round_number=1)  # task 1 is the recent one
    aggregator._known_models(node, task_id=3, round_number=1)
    assert [key[2] for key in aggregator._KNOWN] == [1, 3]
    # Task 2, let go, is read from the store again, to the same.
    assert aggregator._known_models(node, task_id=2, round_number=1) == first[2]
    assert [key[2] for key in aggregator._KNOWN] == [3, 2]
