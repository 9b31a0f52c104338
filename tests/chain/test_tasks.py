"""createTask's rules and escrow, and cancelling before selection."""

from __future__ import annotations

import pytest

from chain.client import FlexMarket
from chain.errors import (
    BudgetTooLowError,
    InvalidBiddingEndError,
    InvalidRoundsError,
    InvalidRoundTimeoutError,
    InvalidTaskStateError,
    InvalidTrainerRangeError,
    NotBuyerError,
    UnknownTaskError,
)
from chain.events import CreditReason, PaymentCredited, TaskCancelled, TaskCreated, TaskState
from tests.chain.conftest import (
    MIN_AGGREGATOR_PRICE_WEI,
    MIN_TRAINER_PRICE_WEI,
    ROUND_TIMEOUT,
    SPEC_HASH,
    Accounts,
    Clock,
    Flow,
    Running,
)


def create(market: FlexMarket, accounts: Accounts, clock: Clock, **overrides):
    args = {
        "sender": accounts.buyer,
        "spec_hash": SPEC_HASH,
        "rounds": 3,
        "min_trainers": 2,
        "max_trainers": 4,
        "bidding_ends": clock.now() + 100,
        "round_timeout": ROUND_TIMEOUT,
        "budget_wei": 3 * (2 * MIN_TRAINER_PRICE_WEI + MIN_AGGREGATOR_PRICE_WEI),
    }
    args.update(overrides)
    return market.create_task(**args)


def test_create_task_locks_budget_and_emits_everything(
    market: FlexMarket, accounts: Accounts, clock: Clock
):
    minimum = 3 * (2 * MIN_TRAINER_PRICE_WEI + MIN_AGGREGATOR_PRICE_WEI)
    ends = clock.now() + 100
    result = create(market, accounts, clock, bidding_ends=ends, budget_wei=minimum)
    event = result.first(TaskCreated)
    assert event.task_id == 1
    assert event.buyer == accounts.buyer.address
    assert event.spec_hash == "0x" + SPEC_HASH.hex()
    assert event.budget_wei == minimum
    assert (event.rounds, event.min_trainers, event.max_trainers) == (3, 2, 4)
    assert (event.bidding_ends, event.round_timeout) == (ends, ROUND_TIMEOUT)
    assert event.min_trainer_price_wei == MIN_TRAINER_PRICE_WEI
    task = market.task(task_id=1)
    assert task.state == TaskState.BIDDING
    assert task.budget_wei == minimum
    assert market.escrow_locked() == minimum
    assert market.balance_wei() == minimum


def test_task_ids_are_sequential(market: FlexMarket, accounts: Accounts, clock: Clock):
    ids = [create(market, accounts, clock).first(TaskCreated).task_id for _ in range(3)]
    assert ids == [1, 2, 3]
    assert market.task_count() == 3


def test_create_task_rejects_budget_below_minimum(
    market: FlexMarket, accounts: Accounts, clock: Clock
):
    minimum = 3 * (2 * MIN_TRAINER_PRICE_WEI + MIN_AGGREGATOR_PRICE_WEI)
    with pytest.raises(BudgetTooLowError) as exc:
        create(market, accounts, clock, budget_wei=minimum - 1)
    assert exc.value.budget_wei == minimum - 1
    assert exc.value.minimum_wei == minimum


@pytest.mark.parametrize("rounds", [0, 101])
def test_create_task_rejects_rounds(market: FlexMarket, accounts: Accounts, clock, rounds):
    with pytest.raises(InvalidRoundsError) as exc:
        create(market, accounts, clock, rounds=rounds, budget_wei=10**18)
    assert exc.value.rounds == rounds
    assert exc.value.max_rounds == 100


@pytest.mark.parametrize(
    ("min_trainers", "max_trainers"), [(0, 3), (4, 3), (1, 129)], ids=["zero", "min>max", "cap"]
)
def test_create_task_rejects_trainer_range(
    market: FlexMarket, accounts: Accounts, clock: Clock, min_trainers, max_trainers
):
    with pytest.raises(InvalidTrainerRangeError) as exc:
        create(
            market,
            accounts,
            clock,
            min_trainers=min_trainers,
            max_trainers=max_trainers,
            budget_wei=10**18,
        )
    assert (exc.value.min_trainers, exc.value.max_trainers, exc.value.cap) == (
        min_trainers,
        max_trainers,
        128,
    )


def test_create_task_accepts_the_trainer_cap(market: FlexMarket, accounts: Accounts, clock):
    result = create(market, accounts, clock, max_trainers=128, budget_wei=10**18)
    assert result.first(TaskCreated).max_trainers == 128


def test_create_task_rejects_past_deadline(market: FlexMarket, accounts: Accounts, clock: Clock):
    with pytest.raises(InvalidBiddingEndError) as exc:
        create(market, accounts, clock, bidding_ends=clock.now() - 1)
    assert exc.value.bidding_ends < exc.value.now_timestamp


@pytest.mark.parametrize("timeout", [0, 30 * 24 * 3600 + 1])
def test_create_task_rejects_round_timeout(market: FlexMarket, accounts: Accounts, clock, timeout):
    with pytest.raises(InvalidRoundTimeoutError) as exc:
        create(market, accounts, clock, round_timeout=timeout)
    assert exc.value.round_timeout == timeout


def test_unknown_task(market: FlexMarket, accounts: Accounts):
    with pytest.raises(UnknownTaskError) as exc:
        market.task(task_id=42)
    assert exc.value.task_id == 42
    with pytest.raises(UnknownTaskError):
        market.cancel_task(sender=accounts.buyer, task_id=42)


def test_cancel_task_refunds_the_whole_budget(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = flow.create_task(budget_wei=10**16)
    result = market.cancel_task(sender=accounts.buyer, task_id=task_id)
    assert result.first(TaskCancelled).task_id == task_id
    credit = result.first(PaymentCredited)
    assert (credit.account, credit.amount_wei, credit.reason) == (
        accounts.buyer.address,
        10**16,
        CreditReason.REFUND,
    )
    assert market.task(task_id=task_id).state == TaskState.CANCELLED
    assert market.credit_of(account=accounts.buyer.address) == 10**16
    assert market.escrow_locked() == 0
    assert market.credits_owed() == market.balance_wei() == 10**16


def test_cancel_task_after_bidding_closed_but_before_selection(
    market: FlexMarket, accounts: Accounts, flow: Flow
):
    task_id = flow.create_task()
    flow.close_bidding(task_id)
    market.cancel_task(sender=accounts.buyer, task_id=task_id)
    assert market.task(task_id=task_id).state == TaskState.CANCELLED


def test_cancel_task_rejects_non_buyer(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = flow.create_task()
    with pytest.raises(NotBuyerError) as exc:
        market.cancel_task(sender=accounts.outsider, task_id=task_id)
    assert (exc.value.task_id, exc.value.account) == (task_id, accounts.outsider.address)


def test_cancel_task_rejects_after_selection(
    market: FlexMarket, accounts: Accounts, running: Running
):
    with pytest.raises(InvalidTaskStateError) as exc:
        market.cancel_task(sender=accounts.buyer, task_id=running.task_id)
    assert exc.value.state == TaskState.RUNNING


def test_cancel_task_twice_refunds_once(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = flow.create_task(budget_wei=10**16)
    market.cancel_task(sender=accounts.buyer, task_id=task_id)
    with pytest.raises(InvalidTaskStateError) as exc:
        market.cancel_task(sender=accounts.buyer, task_id=task_id)
    assert exc.value.state == TaskState.CANCELLED
    assert market.credit_of(account=accounts.buyer.address) == 10**16
