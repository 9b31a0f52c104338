"""placeBid's rules: who may bid, until when, at what price, and bid replacement."""

from __future__ import annotations

import pytest
from eth_utils import keccak
from web3 import Web3

from chain.client import FlexMarket
from chain.errors import (
    BiddingClosedError,
    CannotAggregateError,
    DeviceNotRegisteredError,
    DeviceRevokedError,
    InvalidTaskStateError,
    PriceBelowMinimumError,
    TooManyBidsError,
    UnknownTaskError,
    ZeroSamplesError,
)
from chain.events import BidPlaced, Role, TaskState
from tests.chain.conftest import (
    MIN_AGGREGATOR_PRICE_WEI,
    MIN_TRAINER_PRICE_WEI,
    Accounts,
    Clock,
    Flow,
)

# Storage slot of FlexMarket._bids (declaration order; checked against the chain below).
BIDS_SLOT = 8


def test_place_bid(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = flow.create_task()
    trainer = accounts.trainers[0]
    result = market.place_bid(
        sender=trainer,
        task_id=task_id,
        price_per_round_wei=MIN_TRAINER_PRICE_WEI + 7,
        samples=321,
        role=Role.TRAINER,
    )
    event = result.first(BidPlaced)
    assert (event.task_id, event.device, event.bid_index, event.role) == (
        task_id,
        trainer.address,
        0,
        Role.TRAINER,
    )
    assert (event.price_per_round_wei, event.samples, event.replaced) == (
        MIN_TRAINER_PRICE_WEI + 7,
        321,
        False,
    )
    (bid,) = market.bids(task_id=task_id)
    assert (bid.index, bid.device, bid.price_per_round_wei, bid.samples) == (
        0,
        trainer.address,
        MIN_TRAINER_PRICE_WEI + 7,
        321,
    )
    assert market.bid_index_of(task_id=task_id, device=trainer.address) == 0
    assert market.bid_index_of(task_id=task_id, device=accounts.trainers[1].address) is None
    assert market.task(task_id=task_id).bid_count == 1


def test_new_bid_replaces_the_old_one_in_place(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = flow.create_task()
    flow.bid_trainer(task_id, accounts.trainers[0], MIN_TRAINER_PRICE_WEI)
    flow.bid_aggregator(task_id, accounts.aggregators[0], MIN_AGGREGATOR_PRICE_WEI)
    result = market.place_bid(
        sender=accounts.aggregators[0],
        task_id=task_id,
        price_per_round_wei=5 * MIN_TRAINER_PRICE_WEI,
        samples=50,
        role=Role.TRAINER,
    )
    event = result.first(BidPlaced)
    assert event.bid_index == 1
    assert event.replaced is True
    bids = market.bids(task_id=task_id)
    assert len(bids) == 2
    assert (bids[1].role, bids[1].price_per_round_wei, bids[1].samples) == (
        Role.TRAINER,
        5 * MIN_TRAINER_PRICE_WEI,
        50,
    )


def test_unregistered_device_cannot_bid(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = flow.create_task()
    with pytest.raises(DeviceNotRegisteredError) as exc:
        flow.bid_trainer(task_id, accounts.unregistered, MIN_TRAINER_PRICE_WEI)
    assert exc.value.device == accounts.unregistered.address


def test_revoked_device_cannot_bid(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = flow.create_task()
    market.revoke_device(sender=accounts.owner, device=accounts.trainers[0].address)
    with pytest.raises(DeviceRevokedError) as exc:
        flow.bid_trainer(task_id, accounts.trainers[0], MIN_TRAINER_PRICE_WEI)
    assert exc.value.device == accounts.trainers[0].address


def test_bid_at_the_deadline_is_closed(
    market: FlexMarket, accounts: Accounts, flow: Flow, clock: Clock
):
    task_id = flow.create_task()
    ends = market.task(task_id=task_id).bidding_ends
    clock.next_block_at(ends - 1)
    flow.bid_trainer(task_id, accounts.trainers[0], MIN_TRAINER_PRICE_WEI)
    clock.next_block_at(ends)
    with pytest.raises(BiddingClosedError) as exc:
        flow.bid_trainer(task_id, accounts.trainers[1], MIN_TRAINER_PRICE_WEI)
    assert (exc.value.task_id, exc.value.bidding_ends) == (task_id, ends)


def test_only_aggregating_devices_bid_as_aggregator(
    market: FlexMarket, accounts: Accounts, flow: Flow
):
    task_id = flow.create_task()
    with pytest.raises(CannotAggregateError) as exc:
        flow.bid_aggregator(task_id, accounts.trainers[0], MIN_AGGREGATOR_PRICE_WEI)
    assert exc.value.device == accounts.trainers[0].address


def test_trainer_bid_needs_samples(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = flow.create_task()
    with pytest.raises(ZeroSamplesError):
        flow.bid_trainer(task_id, accounts.trainers[0], MIN_TRAINER_PRICE_WEI, samples=0)


@pytest.mark.parametrize(
    ("role", "minimum"),
    [(Role.TRAINER, MIN_TRAINER_PRICE_WEI), (Role.AGGREGATOR, MIN_AGGREGATOR_PRICE_WEI)],
)
def test_price_below_minimum(market: FlexMarket, accounts: Accounts, flow: Flow, role, minimum):
    task_id = flow.create_task()
    with pytest.raises(PriceBelowMinimumError) as exc:
        market.place_bid(
            sender=accounts.aggregators[0],
            task_id=task_id,
            price_per_round_wei=minimum - 1,
            samples=10,
            role=role,
        )
    assert (exc.value.price_wei, exc.value.minimum_wei) == (minimum - 1, minimum)


def test_bid_on_cancelled_or_unknown_task(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = flow.create_task()
    market.cancel_task(sender=accounts.buyer, task_id=task_id)
    with pytest.raises(InvalidTaskStateError) as exc:
        flow.bid_trainer(task_id, accounts.trainers[0], MIN_TRAINER_PRICE_WEI)
    assert exc.value.state == TaskState.CANCELLED
    with pytest.raises(UnknownTaskError):
        flow.bid_trainer(99, accounts.trainers[0], MIN_TRAINER_PRICE_WEI)


def test_too_many_bids(market: FlexMarket, accounts: Accounts, flow: Flow, w3: Web3):
    """Registering 1000 devices would take most of the suite's time budget, so the bid
    array's length is set in storage directly (at the slot this test first checks)."""
    task_id = flow.create_task()
    flow.bid_trainer(task_id, accounts.trainers[0], MIN_TRAINER_PRICE_WEI)
    flow.bid_trainer(task_id, accounts.trainers[1], MIN_TRAINER_PRICE_WEI)
    slot = int.from_bytes(keccak(task_id.to_bytes(32, "big") + BIDS_SLOT.to_bytes(32, "big")))
    assert int.from_bytes(w3.eth.get_storage_at(market.address, slot)) == 2
    max_bids = market.limits().max_bids
    w3.provider.make_request(
        "anvil_setStorageAt", [market.address, hex(slot), "0x" + max_bids.to_bytes(32).hex()]
    )
    with pytest.raises(TooManyBidsError) as exc:
        flow.bid_trainer(task_id, accounts.trainers[2], MIN_TRAINER_PRICE_WEI)
    assert (exc.value.task_id, exc.value.max_bids) == (task_id, 1000)
    # Replacing an existing bid does not grow the array, so it is still allowed.
    flow.bid_trainer(task_id, accounts.trainers[0], 2 * MIN_TRAINER_PRICE_WEI)
