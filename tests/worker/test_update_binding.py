"""An update belongs to its author: against real nodes, a trainer that hands in a copy of
another's update, the global model's ID or its own update of an earlier round is refused
by the contract, and an altered copy of one (a new ID, the wrong header) or the global
model's values under an update header are left out with a named reason, and the honest
updates aggregate to the bit of an independent
recomputation in plain Python integers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from chain.errors import ModelIdUsedError
from chain.events import Role, TaskCreated
from chain.launcher import dev_accounts
from chain.selection import positions_of
from core.messages import (
    BidRequest,
    InitialModelRequest,
    RoundAggregateRequest,
    RoundTrainRequest,
)
from dataplane.client import fetch_model
from marketplace.models import Device
from tests.worker.conftest import TRAINER_PRICE, Cheat, wait_for
from training.serialize import Header, Kind, decode, encode, id_hex, model_id
from training.spec import TaskSpec

pytestmark = pytest.mark.django_db(transaction=True)

SPEC = TaskSpec.from_dict(
    {"model": "digits-mlp", "dataset": "digits-8x8", "rounds": 2, "local_epochs": 1, "seed": 11}
)


@pytest.fixture
def cheats(cheat_devices) -> dict[str, Cheat]:
    return cheat_devices("copier", "stale", "freerider")


def altered(blob: bytes) -> bytes:
    """The same model under the same header with one value changed: a new ID."""
    model = decode(blob)
    values = [np.array(v, copy=True) for v in model.values]
    values[0].flat[0] += 1
    return encode(model.header, values)


def recompute(blobs: list[bytes], weights: list[int], header: Header) -> bytes:
    """FedAvg as docs/verifiable.md states it, in Python ints: floor(sum(w*u) / sum(w))."""
    values = [decode(b).values for b in blobs]
    total = sum(weights)
    layers = []
    for index in range(len(header.shapes)):
        columns = zip(*(v[index].reshape(-1).tolist() for v in values), strict=True)
        flat = [sum(w * u for w, u in zip(weights, col, strict=True)) // total for col in columns]
        layers.append(np.array(flat, dtype=np.int32).reshape(header.shapes[index]))
    return encode(header, layers)


def test_copy_stale_update_and_global_model_are_left_out_and_the_rest_is_exact(
    nodes, cheats, platform, platform_market
):
    market, w3 = platform_market, platform_market.w3
    platform_account, buyer = dev_accounts(1)[0], dev_accounts(1, start=7)[0]
    aggregator, honest = nodes["aggregator"], [nodes["alice"], nodes["bob"]]
    copier, stale, freerider = cheats["copier"], cheats["stale"], cheats["freerider"]
    now = w3.eth.get_block("pending")["timestamp"]
    task_id = (
        market.create_task(
            sender=buyer,
            spec_hash=SPEC.hash,
            rounds=SPEC.rounds,
            min_trainers=5,
            max_trainers=5,
            bidding_ends=now + 3600,
            round_timeout=600,
            budget_wei=10**16,
        )
        .first(TaskCreated)
        .task_id
    )
    spec = SPEC.as_dict()
    for n in nodes.values():
        platform.send("worker.bid", BidRequest, n, task_id=task_id, spec=spec)
    wait_for(lambda: len(market.bids(task_id=task_id)) == len(nodes))
    for cheat in cheats.values():
        market.place_bid(
            sender=cheat.account,
            task_id=task_id,
            price_per_round_wei=TRAINER_PRICE,
            samples=300,
            role=Role.TRAINER,
        )
    w3.provider.make_request("evm_increaseTime", [3601])
    w3.provider.make_request("evm_mine", [])
    market.select_nodes(sender=platform_account, task_id=task_id)
    trainers = market.selection(task_id=task_id).trainers
    assert len(trainers) == 5
    platform.send(
        "worker.publish_initial", InitialModelRequest, aggregator, task_id=task_id, spec=spec
    )
    platform.reports(1)
    # What the platform's lifecycle sends: each peer's URL and certificate as registered.
    devices = {d.address: d for d in Device.objects.all()}
    peers = [*(n.config.address for n in honest), *(c.address for c in cheats.values())]
    urls = {a: devices[a].dataplane_url for a in peers}
    certs = {a: devices[a].dataplane_cert_sha256 for a in peers}
    aggregator_cert = devices[aggregator.config.address].dataplane_cert_sha256
    samples = {b.device: b.samples for b in market.bids(task_id=task_id)}
    stale_id = None
    for round_number in range(SPEC.rounds):
        at = {"task_id": task_id, "round_number": round_number}
        for n in honest:
            platform.send(
                "worker.train",
                RoundTrainRequest,
                n,
                **at,
                spec=spec,
                aggregator_url=aggregator.config.dataplane_url,
                aggregator_cert_sha256=aggregator_cert,
            )
        platform.reports(len(honest))
        honest_ids = [market.update_of(**at, trainer=n.config.address) for n in honest]
        global_id = market.global_model(**at)
        # The copier hands in Alice's update: the contract refuses an ID used before. So it
        # hands in a copy with one value changed (a new ID, Alice's header), and serves it.
        with pytest.raises(ModelIdUsedError):
            market.submit_update(sender=copier.account, **at, model_id=honest_ids[0])
        copy = altered(honest[0].store.get(honest_ids[0]))
        market.submit_update(sender=copier.account, **at, model_id=id_hex(copier.store.put(copy)))
        # The free rider fetches the global model, as any selected trainer may, and hands it in:
        # refused on chain as well; an altered global model gets past the contract only.
        global_blob = fetch_model(
            base_url=aggregator.config.dataplane_url,
            cert_sha256=aggregator_cert,
            model_id=global_id,
            server_address=aggregator.config.address,
            account=freerider.account,
        )
        with pytest.raises(ModelIdUsedError):
            market.submit_update(sender=freerider.account, **at, model_id=global_id)
        ride = id_hex(freerider.store.put(altered(global_blob)))
        market.submit_update(sender=freerider.account, **at, model_id=ride)
        # The stale trainer hands in a well-formed update of its own in round 0; in round 1
        # the same one is refused on chain, and an altered copy of it names round 0.
        if stale_id is None:
            own = decode(global_blob)
            header = dataclasses.replace(own.header, kind=Kind.UPDATE, trainer=stale.address)
            stale_id = id_hex(stale.store.put(encode(header, own.values)))
            market.submit_update(sender=stale.account, **at, model_id=stale_id)
        else:
            with pytest.raises(ModelIdUsedError):
                market.submit_update(sender=stale.account, **at, model_id=stale_id)
            again = id_hex(stale.store.put(altered(stale.store.get(stale_id))))
            market.submit_update(sender=stale.account, **at, model_id=again)

        platform.send(
            "worker.aggregate",
            RoundAggregateRequest,
            aggregator,
            **at,
            spec=spec,
            trainer_urls=urls,
            trainer_certs_sha256=certs,
        )
        [summary] = platform.reports(1)

        reasons = summary.left_out
        expected = {copier.address: "update_wrong_author", freerider.address: "model_wrong_kind"}
        expected[stale.address] = "model_wrong_round" if round_number else "update_copied"
        assert reasons == expected
        accepted = [n.config.address for n in honest]
        info = market.round_info(**at)
        assert positions_of(info.aggregated_mask) == sorted(trainers.index(t) for t in accepted)
        blobs = [n.store.get(i) for n, i in zip(honest, honest_ids, strict=True)]
        header = Header(
            kind=Kind.GLOBAL,
            chain_id=w3.eth.chain_id,
            contract=market.address,
            task_id=task_id,
            round_number=round_number + 1,
            shapes=decode(blobs[0]).header.shapes,
        )
        recomputed = recompute(blobs, [samples[t] for t in accepted], header)
        published = market.global_model(task_id=task_id, round_number=round_number + 1)
        assert summary.model_id == published == id_hex(model_id(recomputed))
        assert aggregator.store.get(published) == recomputed
