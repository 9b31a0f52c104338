"""The cost estimate: from the prices enrolled devices ask now (their bids, else what they
declared at enrolment), with the gas of the whole task, and none for a task the form refuses."""

from __future__ import annotations

import pytest
from django.urls import reverse
from django.utils import timezone
from eth_account import Account

from chain.node import max_fee_per_gas
from marketplace import contract
from marketplace.estimates import cost_estimate, task_gas_units
from marketplace.models import Bid, Device, Task
from tests.marketplace.people import buyer_signup, device_enrol

pytestmark = pytest.mark.django_db

MIN_PRICE_WEI = 10**14  # tests/conftest.py deploys the platform market with these minimums


@pytest.fixture
def logged_in(client):
    client.force_login(buyer_signup("buyer"))
    return client


def test_estimate_without_devices_uses_the_contract_minimums():
    estimate = cost_estimate(rounds=3, min_trainers=2, max_trainers=4)

    assert estimate.minimum_wei == 3 * (2 + 1) * MIN_PRICE_WEI
    assert estimate.low_wei == estimate.minimum_wei
    assert estimate.high_wei == 3 * (4 + 1) * MIN_PRICE_WEI
    assert not estimate.from_devices
    assert estimate.gas_wei == estimate.gas_units * max_fee_per_gas(contract.w3()) > 0


def _device_with_bid(address: str, price: int, *, role="trainer", revoked=False) -> None:
    # Mirror rows stand in for what chain sync writes from DeviceRegistered and BidPlaced.
    Device.objects.create(
        name=address[-4:],
        address=address,
        device_class="cpu",
        may_aggregate=role == "aggregator",
        chain_status="revoked" if revoked else "active",
    )
    task = Task.objects.first() or Task.objects.create(
        chain_task_id=10_000,
        buyer_address=address,
        spec_hash="0x" + "00" * 32,
        created_tx="0x" + "cd" * 32,
        created_block=1,
        budget_wei=1,
        rounds=1,
        min_trainers=1,
        max_trainers=1,
        bidding_ends=timezone.now(),
        round_timeout_s=60,
    )
    Bid.objects.create(
        task=task,
        device=address,
        bid_index=Bid.objects.count(),
        role=role,
        price_per_round_wei=price,
        samples=100,
        tx_hash="0x" + "ab" * 32,
        block_number=1,
    )


def test_estimate_follows_the_prices_devices_ask():
    _device_with_bid("0x" + "11" * 20, 3 * MIN_PRICE_WEI)
    _device_with_bid("0x" + "22" * 20, 2 * MIN_PRICE_WEI)
    _device_with_bid("0x" + "33" * 20, 5 * MIN_PRICE_WEI)
    _device_with_bid("0x" + "44" * 20, 9 * MIN_PRICE_WEI, revoked=True)  # cannot be selected
    _device_with_bid("0x" + "55" * 20, 4 * MIN_PRICE_WEI, role="aggregator")
    _device_with_bid("0x" + "66" * 20, MIN_PRICE_WEI // 2)  # below the floor: counts at it

    estimate = cost_estimate(rounds=2, min_trainers=2, max_trainers=4)

    assert estimate.trainer_prices_wei == tuple(p * MIN_PRICE_WEI for p in (1, 2, 3, 5))
    assert estimate.low_wei == 2 * (1 + 2 + 4) * MIN_PRICE_WEI
    assert estimate.high_wei == 2 * (5 + 3 + 2 + 1 + 4) * MIN_PRICE_WEI
    assert estimate.minimum_wei == 2 * (2 + 1) * MIN_PRICE_WEI


def test_estimate_endpoint_gives_exact_strings(logged_in):
    response = logged_in.get(
        reverse("task-estimate"), {"rounds": 4, "min_trainers": 2, "max_trainers": 3}
    )

    body = response.json()
    assert response.status_code == 200
    assert (body["rounds"], body["min_trainers"], body["max_trainers"]) == (4, 2, 3)
    assert body["minimum_wei"] == str(4 * 3 * MIN_PRICE_WEI)  # in ETH by units.js
    assert int(body["task_gas_wei"]) > int(body["gas_wei"]) > 0


@pytest.mark.parametrize(
    ("shape", "field", "words"),
    [
        ({"rounds": 0}, "rounds", "greater than or equal to 1"),
        ({"rounds": -3}, "rounds", "greater than or equal to 1"),
        ({"rounds": 1_000_000}, "rounds", "Between 1 and 100 rounds"),
        ({"min_trainers": 3, "max_trainers": 2}, "max_trainers", "at least the minimum"),
        ({"max_trainers": 10_000}, "max_trainers", "At most 128 trainers"),
        ({"rounds": "many"}, "rounds", "whole number"),
    ],
)
def test_no_estimate_for_what_the_form_refuses(logged_in, shape, field, words):
    query = {"rounds": 5, "min_trainers": 2, "max_trainers": 4, **shape}

    response = logged_in.get(reverse("task-estimate"), query)

    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid"
    assert words in " ".join(body["fields"][field])
    assert "low_wei" not in body


def test_enrolled_devices_that_never_bid_count_at_the_prices_they_declared(logged_in):
    for price in (2, 7):
        device_enrol(
            Account.create(), name=f"new-{price}", price_per_round_wei=price * MIN_PRICE_WEI
        )
    device_enrol(
        Account.create(),
        name="gpu-box",
        may_aggregate=True,
        price_per_round_wei=4 * MIN_PRICE_WEI,
        aggregator_price_per_round_wei=3 * MIN_PRICE_WEI,
    )

    estimate = cost_estimate(rounds=2, min_trainers=1, max_trainers=2)

    assert estimate.from_devices
    assert estimate.trainer_prices_wei == tuple(p * MIN_PRICE_WEI for p in (2, 4, 7))
    assert estimate.aggregator_prices_wei == (3 * MIN_PRICE_WEI,)
    assert estimate.low_wei == 2 * (2 + 3) * MIN_PRICE_WEI
    assert estimate.high_wei == 2 * (7 + 4 + 3) * MIN_PRICE_WEI
    body = logged_in.get(
        reverse("task-estimate"), {"rounds": 2, "min_trainers": 1, "max_trainers": 2}
    ).json()
    assert body["basis"] == "From the prices 3 trainers and 1 aggregator ask now."


def test_the_whole_tasks_gas_grows_with_rounds_and_trainers():
    small = cost_estimate(rounds=1, min_trainers=1, max_trainers=1)
    large = cost_estimate(rounds=10, min_trainers=1, max_trainers=8)

    assert small.task_gas_units > small.gas_units  # more than posting it
    assert large.task_gas_units > small.task_gas_units
    assert large.task_gas_units == task_gas_units(rounds=10, trainers=8, bidders=9)
    assert large.task_gas_wei == large.task_gas_units * max_fee_per_gas(contract.w3())
