"""Devices that cheat, for the end-to-end tests only: the ordinary device worker with one part
replaced before its pool forks.

    python -m tests.e2e.misbehaving freeride start --home DIR ...
    python -m tests.e2e.misbehaving noise start --home DIR ...

``freeride``: trains nothing; hands in the round's global model under an update header of its
own (the copy a free rider can make: the global model's own ID is refused by its header).
``noise``: trains honestly, on samples and labels drawn at random instead of its data.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import numpy as np

from training.catalogue import SCHEMAS
from training.datasets import Dataset
from training.serialize import Kind, encode, id_hex
from worker import trainer
from worker.__main__ import main
from worker.node import Node

log = logging.getLogger(__name__)
NOISE_SAMPLES = 300


def freeride(
    node: Node,
    *,
    task_id: int,
    round_number: int,
    spec: dict,
    aggregator_url: str,
    aggregator_cert: str,
) -> dict | None:
    parsed = trainer.verified_spec(node, task_id=task_id, spec=spec)
    market = node.market
    task = market.task(task_id=task_id)
    if market.update_of(task_id=task_id, round_number=round_number, trainer=node.address):
        return None
    current = trainer.global_model(
        node,
        spec=parsed,
        task_id=task_id,
        round_number=round_number,
        model_id=market.global_model(task_id=task_id, round_number=round_number),
        source_url=aggregator_url,
        source_cert=aggregator_cert,
        source=task.aggregator,
    )
    header = dataclasses.replace(current.header, kind=Kind.UPDATE, trainer=node.address)
    copy_id = id_hex(node.store.put(encode(header, current.values)))
    tx = market.submit_update(
        sender=node.account, task_id=task_id, round_number=round_number, model_id=copy_id
    )
    log.info(
        "task %s: round %s global model handed in as update %s", task_id, round_number, copy_id
    )
    return {
        "task_id": task_id,
        "round": round_number,
        "device": node.address,
        "update_id": copy_id,
        "tx_hash": tx.tx_hash,
    }


def noise_data(self: Node, dataset: str) -> Dataset:
    schema = SCHEMAS[dataset]
    rng = np.random.default_rng(int(self.address, 16) % 2**32)
    x = rng.random((NOISE_SAMPLES, *schema.input_shape), dtype=np.float32)
    return Dataset(x=x, y=rng.integers(0, schema.num_classes, NOISE_SAMPLES))


BEHAVIOURS = {
    "freeride": lambda: setattr(trainer, "train", freeride),
    "noise": lambda: setattr(Node, "data_for", noise_data),
}

if __name__ == "__main__":
    BEHAVIOURS[sys.argv[1]]()
    sys.exit(main(sys.argv[2:]))
