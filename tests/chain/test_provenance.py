"""Provenance from the chain and the blobs alone: an honest task is recomputed to the bit,
a lying aggregator is named with the round and value, and the challenge the report names is
one the verifier contract upholds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chain.events import TaskCreated
from chain.fraud import FlexVerifier, Verdict
from chain.launcher import LocalChain
from chain.selection import mask_of
from dataplane.audit import IncludedBlob, challenge, context_of, recompute
from tests.chain.conftest import Accounts, Flow
from training.catalogue import initial_weights
from training.fixedpoint import quantize
from training.serialize import ZERO_ADDRESS, Header, Kind, encode, id_hex
from training.spec import TaskSpec
from training.store import ModelStore
from worker.provenance import SpecHashMismatchError, folder_blobs, provenance

SPEC = TaskSpec.from_dict(
    {"model": "digits-mlp", "dataset": "digits-8x8", "rounds": 1, "local_epochs": 1, "seed": 3}
)
SAMPLES = (100, 250, 40)
LIE_AT = 300  # chunk 1, value 44


def run_task(
    flow: Flow,
    accounts: Accounts,
    store: ModelStore,
    *,
    lie: bool,
    stale: bool = False,
    dispute_window: int = 0,
) -> int:
    """One round of a real spec's task on chain, the blobs kept in ``store``; the aggregator
    publishes the exact FedAvg, or with one value off by one. With ``stale`` the last trainer
    hands in an update whose header names another round, and the aggregator includes it."""
    market = flow.market
    task_id = (
        market.create_task(
            sender=accounts.buyer,
            spec_hash=SPEC.hash,
            rounds=1,
            min_trainers=3,
            max_trainers=3,
            bidding_ends=flow.clock.now() + 1000,
            round_timeout=600,
            budget_wei=10**15,
            dispute_window=dispute_window,
        )
        .first(TaskCreated)
        .task_id
    )
    aggregator = accounts.aggregators[0]
    flow.bid_aggregator(task_id, aggregator, 2_000_000_000)
    for trainer, samples in zip(accounts.trainers, SAMPLES, strict=False):
        flow.bid_trainer(task_id, trainer, 1_000_000_000, samples=samples)
    flow.close_bidding(task_id)
    market.select_nodes(sender=accounts.outsider, task_id=task_id)
    trainers = market.selection(task_id=task_id).trainers
    shapes = tuple(SPEC.model_entry.weight_shapes())

    def header(kind: Kind, round_number: int, trainer: str = ZERO_ADDRESS) -> Header:
        return Header(
            kind=kind,
            chain_id=market.w3.eth.chain_id,
            contract=market.address,
            task_id=task_id,
            round_number=round_number,
            trainer=trainer,
            shapes=shapes,
        )

    initial = quantize(initial_weights(spec=SPEC))
    zero = store.put(encode(header(Kind.GLOBAL, 0), initial))
    market.publish_global_model(
        sender=aggregator,
        task_id=task_id,
        round_number=0,
        model_id=id_hex(zero),
        aggregated_mask=0,
        scores=[],
    )
    rng = np.random.default_rng(task_id)
    by_address = {t.address: t for t in accounts.trainers}
    samples = {t.address: s for t, s in zip(accounts.trainers, SAMPLES, strict=False)}
    included = []
    for k, trainer in enumerate(trainers):
        values = [v + rng.integers(-500, 500, v.shape, dtype=np.int32) for v in initial]
        made_in = 5 if stale and k == len(trainers) - 1 else 0
        update = store.put(encode(header(Kind.UPDATE, made_in, trainer), values))
        market.submit_update(
            sender=by_address[trainer], task_id=task_id, round_number=0, model_id=id_hex(update)
        )
        included.append(IncludedBlob(store.load(update), trainer, samples[trainer]))
    aggregate = recompute(included, strategy="fedavg")
    if lie:
        flat = aggregate[0].reshape(-1)
        flat[LIE_AT] += 1
    one = store.put(encode(header(Kind.GLOBAL, 1), aggregate))
    market.publish_global_model(
        sender=aggregator,
        task_id=task_id,
        round_number=1,
        model_id=id_hex(one),
        aggregated_mask=mask_of(range(3)),
        scores=[],
    )
    return task_id


def test_an_honest_task_is_recomputed_to_the_bit(flow, accounts, tmp_path):
    store = ModelStore(tmp_path / "store")
    task_id = run_task(flow, accounts, store, lie=False)
    market = flow.market
    market.finalize(sender=accounts.outsider, task_id=task_id)
    report = provenance(
        market, task_id=task_id, spec=SPEC.as_dict(), blobs=folder_blobs([store.root])
    )
    assert report["verified"] is True
    zero, one = report["rounds"]
    assert (zero["made_from"], zero["verified"]) == ("spec", True)
    assert one["verified"]
    assert one["recomputed"] == one["global_model"]
    trainers = market.selection(task_id=task_id).trainers
    assert [u["trainer"] for u in one["updates"]] == list(trainers)
    weights = dict(zip([t.address for t in accounts.trainers], SAMPLES, strict=False))
    assert [u["weight"] for u in one["updates"]] == [weights[t] for t in trainers]
    # What the contract credited for the task, from its events: each trainer and the
    # aggregator were paid, the rest refunded to the buyer; together, the budget. Their
    # stakes and the bond came back beside it.
    paid = report["payments"]
    assert set(paid) == {*trainers, accounts.aggregators[0].address, accounts.buyer.address}
    spent = ("trainer_pay", "aggregator_pay", "refund")
    assert sum(r.get(k, 0) for r in paid.values() for k in spent) == 10**15
    info = market.task(task_id=task_id)
    deposits = 3 * info.trainer_stake_wei + info.aggregator_bond_wei
    assert sum(r.get("stake_returned", 0) for r in paid.values()) == deposits


def test_a_lying_aggregator_is_named_with_the_value_and_the_challenge_holds(
    flow, accounts, tmp_path, w3
):
    store = ModelStore(tmp_path / "store")
    task_id = run_task(flow, accounts, store, lie=True)
    market = flow.market
    report = provenance(
        market, task_id=task_id, spec=SPEC.as_dict(), blobs=folder_blobs([store.root])
    )
    assert report["verified"] is False
    one = report["rounds"][1]
    assert one["verified"] is False
    assert (one["mismatch"]["chunk"], one["mismatch"]["offset"]) == divmod(LIE_AT, 256)

    published = store.load(one["global_model"])
    included = [
        IncludedBlob(store.load(u["update_id"]), u["trainer"], u["weight"]) for u in one["updates"]
    ]
    sent = challenge(
        context=context_of(published, strategy="fedavg"),
        published=published,
        included=included,
        index=LIE_AT,
    )
    assert sent.chunk == one["mismatch"]["challenge"]["chunk"]
    finding = FlexVerifier.deploy(w3=w3, sender=accounts.owner).check(sent)
    assert finding.verdict == Verdict.WRONG_VALUE
    assert finding.claimed == finding.expected + 1


def test_a_missing_blob_leaves_the_round_unchecked_not_verified(flow, accounts, tmp_path):
    store = ModelStore(tmp_path / "store")
    task_id = run_task(flow, accounts, store, lie=False)
    one_update = flow.market.update_of(
        task_id=task_id, round_number=0, trainer=flow.market.selection(task_id=task_id).trainers[1]
    )
    store.path(one_update).unlink()
    report = provenance(
        flow.market, task_id=task_id, spec=SPEC.as_dict(), blobs=folder_blobs([store.root])
    )
    assert report["verified"] is False
    assert report["rounds"][1]["missing"] == [one_update]
    assert report["rounds"][1]["mismatch"] is None


def test_the_command_needs_only_the_rpc_the_contract_and_the_blobs(
    flow, accounts, tmp_path, chain_node: LocalChain
):
    store = ModelStore(tmp_path / "store")
    task_id = run_task(flow, accounts, store, lie=True)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC.as_dict()))
    out = tmp_path / "report.json"
    args = [
        sys.executable,
        "-m",
        "worker",
        "provenance",
        "--rpc",
        chain_node.rpc_url,
        "--contract",
        flow.market.address,
        "--task",
        str(task_id),
        "--spec",
        str(spec),
        "--blobs",
        str(store.root),
        "--json",
        str(out),
    ]
    done = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 1, done.stderr
    assert "DIFFERS at chunk 1, value 44" in done.stdout
    assert json.loads(out.read_text())["verified"] is False
    wrong_spec = dict(SPEC.as_dict(), seed=4)
    spec.write_text(json.dumps(wrong_spec))
    done = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 1
    assert "spec" in done.stderr


def test_a_spec_other_than_the_tasks_is_refused(flow, accounts, tmp_path):
    store = ModelStore(tmp_path / "store")
    task_id = run_task(flow, accounts, store, lie=False)
    with pytest.raises(SpecHashMismatchError) as exc:
        provenance(
            flow.market,
            task_id=task_id,
            spec=dict(SPEC.as_dict(), seed=4),
            blobs=folder_blobs([store.root]),
        )
    assert exc.value.on_chain == SPEC.hash_hex
