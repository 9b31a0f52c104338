"""Contribution measured and paid, against real nodes: the aggregator fetches the buyer's
uploaded validation set from the platform, leaves a free rider's copy of the global model out,
scores a trainer whose data is noise at the floor and the honest trainers above it, publishes
the scores with the mask, and the contract pays by them."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest

from chain.events import CreditReason, PaymentCredited, Reason, Role
from chain.fraud import Exclusion
from chain.selection import positions_of
from core.messages import BidRequest, InitialModelRequest, RoundAggregateRequest, RoundTrainRequest
from dataplane.client import fetch_model
from marketplace import contract, services
from marketplace.models import Device
from marketplace.validation import validation_set_upload
from tests.worker.conftest import TRAINER_PRICE, Cheat, wait_for
from training.datasets import Dataset, load_test
from training.fixedpoint import quantize
from training.scoring import FLOOR, FULL_SCALE
from training.serialize import Kind, decode, encode, id_hex
from training.spec import TaskSpec

pytestmark = pytest.mark.django_db(transaction=True)

ROUNDS = 2


def npz(data: Dataset) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=data.x, y=data.y)
    return buffer.getvalue()


def noise(count: int) -> Dataset:
    rng = np.random.default_rng(17)
    return Dataset(x=rng.random((count, 8, 8, 1), dtype=np.float32), y=rng.integers(0, 10, count))


def test_free_rider_and_noise_earn_next_to_nothing_and_honest_trainers_are_paid_by_score(
    nodes, cheat_devices, platform, platform_market
):
    from training.local import train_round  # the noisy trainer trains here, in the test

    market, w3 = platform_market, platform_market.w3
    cheats: dict[str, Cheat] = cheat_devices("noisy", "freerider")
    noisy, freerider = cheats["noisy"], cheats["freerider"]
    aggregator, honest = nodes["aggregator"], [nodes["alice"], nodes["bob"]]
    buyer = services.user_signup(username="scored-buyer", password="a-long-test-passphrase")
    services.wallet_fund(wallet=buyer.wallet)
    held_out = load_test(schema="digits-8x8")
    uploaded = validation_set_upload(
        data=npz(Dataset(x=held_out.x[::2], y=held_out.y[::2])),
        filename="held-out.npz",
        dataset="digits-8x8",
        buyer=buyer,
    )
    spec = TaskSpec.from_dict(
        {
            "model": "digits-mlp",
            "dataset": "digits-8x8",
            "rounds": ROUNDS,
            "seed": 3,
            "validation": uploaded.content_id,
        }
    )
    order = services.task_create(
        buyer=buyer,
        title="scored",
        spec=spec,
        min_trainers=4,
        max_trainers=4,
        round_timeout_s=600,
        dispute_window_s=0,  # settled right after its last round
        budget_wei=10**16,
        bidding_window_s=3600,
    )
    task_id = order.chain_task_id
    assert order.spec["validation"] == uploaded.content_id
    sent = spec.as_dict()
    for n in nodes.values():
        platform.send("worker.bid", BidRequest, n, task_id=task_id, spec=sent)
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
    market.select_nodes(sender=contract.registrar(), task_id=task_id)
    trainers = market.selection(task_id=task_id).trainers
    assert len(trainers) == 4
    platform.send(
        "worker.publish_initial", InitialModelRequest, aggregator, task_id=task_id, spec=sent
    )
    platform.reports(1)
    devices = {d.address: d for d in Device.objects.all()}
    peers = [*(n.config.address for n in honest), *(c.address for c in cheats.values())]
    urls = {a: devices[a].dataplane_url for a in peers}
    certs = {a: devices[a].dataplane_cert_sha256 for a in peers}
    aggregator_cert = devices[aggregator.config.address].dataplane_cert_sha256
    noisy_data = noise(300)

    for round_number in range(ROUNDS):
        at = {"task_id": task_id, "round_number": round_number}
        for n in honest:
            platform.send(
                "worker.train",
                RoundTrainRequest,
                n,
                **at,
                spec=sent,
                aggregator_url=aggregator.config.dataplane_url,
                aggregator_cert_sha256=aggregator_cert,
            )
        platform.reports(len(honest))
        global_blob = fetch_model(
            base_url=aggregator.config.dataplane_url,
            cert_sha256=aggregator_cert,
            model_id=market.global_model(**at),
            server_address=aggregator.config.address,
            account=freerider.account,
        )
        current = decode(global_blob)
        # The free rider hands in the global model's values under an update header of its own.
        header = dataclasses.replace(current.header, kind=Kind.UPDATE, trainer=freerider.address)
        copy_id = id_hex(freerider.store.put(encode(header, current.values)))
        market.submit_update(sender=freerider.account, **at, model_id=copy_id)
        # The noisy trainer really trains, on data that is noise.
        trained = train_round(
            spec=spec, weights=current.floats(), data=noisy_data, round_number=round_number
        )
        header = dataclasses.replace(current.header, kind=Kind.UPDATE, trainer=noisy.address)
        noisy_id = id_hex(noisy.store.put(encode(header, quantize(trained.weights))))
        market.submit_update(sender=noisy.account, **at, model_id=noisy_id)

        platform.send(
            "worker.aggregate",
            RoundAggregateRequest,
            aggregator,
            **at,
            spec=sent,
            trainer_urls=urls,
            trainer_certs_sha256=certs,
        )
        [summary] = platform.reports(1)

        assert summary.left_out == {freerider.address: "update_copied"}
        # ... and the aggregator said so on chain, naming the model copied: a contest fails.
        statement = market.exclusions_of(task_id=task_id, round_number=round_number + 1)
        copied = market.global_model(**at)
        position = trainers.index(freerider.address)
        assert Exclusion.decode_all(statement) == (Exclusion(position, Reason.COPIED, copied),)
        info = market.round_info(**at)
        scored = [trainers[p] for p in positions_of(info.aggregated_mask)]
        assert set(scored) == {noisy.address, *(n.config.address for n in honest)}
        score = dict(zip(scored, info.scores, strict=True))
        assert score[noisy.address] == FLOOR
        assert all(score[n.config.address] > FLOOR for n in honest)
        assert max(info.scores) == FULL_SCALE

    # The aggregator fetched the uploaded set once, by its content ID, and kept it.
    kept = aggregator.home / "validation" / f"{uploaded.content_id}.bin"
    assert kept.read_bytes() == bytes(uploaded.data)

    done = market.finalize(sender=contract.registrar(), task_id=task_id)
    # Pay for work only: each trainer's stake also comes back at finalize.
    pay = dict.fromkeys(trainers, 0)
    for credit in done.all(PaymentCredited):
        if credit.reason == CreditReason.TRAINER_PAY:
            pay[credit.account] += credit.amount_wei
    assert pay[freerider.address] == 0
    honest_pay = [pay[n.config.address] for n in honest]
    # Noise is paid its floor share of each round's pool: under 5 % of what it bid.
    assert 0 < pay[noisy.address] < ROUNDS * TRAINER_PRICE * 5 // 100
    assert min(honest_pay) > 10 * pay[noisy.address]
