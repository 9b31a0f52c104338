"""Attacks on pay against the real chain: each participant tries to take more than its work
earns, and the contract refuses or makes it pointless."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chain.client import FlexMarket
from chain.errors import (
    BidSelectedError,
    BuyerCannotAggregateError,
    InvalidSampleCapError,
    ModelIdUsedError,
    NoBidError,
    NotBidderError,
    RoundStillOpenError,
    WrongDepositError,
)
from chain.events import (
    BidPlaced,
    BidWithdrawn,
    CreditReason,
    DeviceClass,
    NodesSelected,
    PaymentCredited,
    Role,
    TaskCreated,
)
from chain.selection import mask_of
from tests.chain.conftest import (
    MIN_AGGREGATOR_PRICE_WEI,
    MIN_TRAINER_PRICE_WEI,
    ROUND_TIMEOUT,
    SPEC_HASH,
    Accounts,
    Clock,
    Flow,
    Running,
    model_id,
)
from tests.chain.oracle import round_pay

GWEI = 10**9
UINT64_MAX = 2**64 - 1


def trainer_pay(result) -> dict[str, int]:
    return {
        e.account: e.amount_wei
        for e in result.all(PaymentCredited)
        if e.reason == CreditReason.TRAINER_PAY
    }


# ---- claims that cannot take over


def test_sample_liar_is_ranked_by_the_cap_not_its_claim(
    market: FlexMarket, accounts: Accounts, flow: Flow
):
    task_id = flow.create_task(rounds=1, max_trainers=2, budget_wei=10**18)
    assert market.task(task_id=task_id).sample_cap == 1000
    liar, honest_a, honest_b = accounts.trainers[:3]
    flow.bid_aggregator(task_id, accounts.aggregators[0], MIN_AGGREGATOR_PRICE_WEI)
    # 4x the honest price with 2^64-1 samples used to rank first by far.
    placed = market.place_bid(
        sender=liar,
        task_id=task_id,
        price_per_round_wei=4 * GWEI,
        samples=UINT64_MAX,
        role=Role.TRAINER,
    ).first(BidPlaced)
    assert placed.samples == 1000
    flow.bid_trainer(task_id, honest_a, GWEI, samples=500)
    flow.bid_trainer(task_id, honest_b, GWEI, samples=400)
    assert {b.samples for b in market.bids(task_id=task_id) if b.device == liar.address} == {1000}
    flow.close_bidding(task_id)
    event = market.select_nodes(sender=accounts.outsider, task_id=task_id).first(NodesSelected)
    # Per capped sample the liar asks 4 gwei/1000, the honest 1/500 and 1/400: both first.
    assert event.trainers == (honest_a.address, honest_b.address)


def test_buyer_sets_the_sample_cap_and_zero_is_refused(
    market: FlexMarket, accounts: Accounts, clock: Clock
):
    args = dict(
        sender=accounts.buyer,
        spec_hash=SPEC_HASH,
        rounds=1,
        min_trainers=1,
        max_trainers=1,
        bidding_ends=clock.now() + 100,
        round_timeout=ROUND_TIMEOUT,
        budget_wei=10**16,
    )
    with pytest.raises(InvalidSampleCapError) as exc:
        market.create_task(**args, sample_cap=0)
    assert exc.value.sample_cap == 0
    created = market.create_task(**args, sample_cap=64).first(TaskCreated)
    assert created.sample_cap == 64
    placed = market.place_bid(
        sender=accounts.trainers[0],
        task_id=created.task_id,
        price_per_round_wei=MIN_TRAINER_PRICE_WEI,
        samples=65,
        role=Role.TRAINER,
    ).first(BidPlaced)
    assert placed.samples == 64


# ---- updates bound to their authors


def test_copier_cannot_submit_another_trainers_update(market: FlexMarket, running: Running):
    author, copier = running.trainers[:2]
    update = model_id("authored")
    market.submit_update(sender=author, task_id=running.task_id, round_number=0, model_id=update)
    with pytest.raises(ModelIdUsedError) as exc:
        market.submit_update(
            sender=copier, task_id=running.task_id, round_number=0, model_id=update
        )
    assert exc.value.model_id == update
    origin = market.model_origin(model_id=update)
    assert origin is not None
    assert (origin.is_global, origin.task_id, origin.round, origin.author) == (
        False,
        running.task_id,
        0,
        author.address,
    )
    assert (
        market.update_of(task_id=running.task_id, round_number=0, trainer=author.address) == update
    )
    assert market.update_of(task_id=running.task_id, round_number=0, trainer=copier.address) is None


def test_global_model_id_is_no_update(
    market: FlexMarket, accounts: Accounts, flow: Flow, running: Running
):
    free_rider = running.trainers[0]
    with pytest.raises(ModelIdUsedError):
        market.submit_update(
            sender=free_rider,
            task_id=running.task_id,
            round_number=0,
            model_id=running.published[0],
        )
    # Nor is another task's global model.
    other = flow.start()
    with pytest.raises(ModelIdUsedError):
        market.submit_update(
            sender=other.trainers[0],
            task_id=other.task_id,
            round_number=0,
            model_id=running.published[0],
        )
    origin = market.model_origin(model_id=running.published[0])
    assert origin is not None
    assert origin.is_global
    assert origin.author == running.aggregator.address


def test_stale_update_of_ones_own_is_refused(market: FlexMarket, flow: Flow, running: Running):
    flow.run_round(running, 0)
    old = model_id(f"{running.task_id}-update-0-0")
    with pytest.raises(ModelIdUsedError):
        market.submit_update(
            sender=running.trainers[0], task_id=running.task_id, round_number=1, model_id=old
        )


def test_aggregator_cannot_republish_a_global_model(
    market: FlexMarket, flow: Flow, running: Running
):
    flow.submit(running, 0, [0, 1, 2])
    with pytest.raises(ModelIdUsedError):
        market.publish_global_model(
            sender=running.aggregator,
            task_id=running.task_id,
            round_number=1,
            model_id=running.published[0],
            aggregated_mask=running.everyone,
        )


# ---- rounds close by the rules


def test_early_publish_reverts_until_everyone_submitted_or_the_window_passed(
    market: FlexMarket, flow: Flow, clock: Clock, running: Running
):
    flow.submit(running, 0, [0, 1])
    deadline = market.task(task_id=running.task_id).submission_deadline
    with pytest.raises(RoundStillOpenError) as exc:
        flow.publish(running, 1, mask_of([0, 1]))
    assert (exc.value.task_id, exc.value.round, exc.value.deadline) == (
        running.task_id,
        1,
        deadline,
    )
    # The last trainer is still in time: its submission is not raced out.
    flow.submit(running, 0, [2])
    flow.publish(running, 1, running.everyone)
    # Next round: after the window, a partial round may close.
    flow.submit(running, 1, [1])
    clock.mine_at(market.task(task_id=running.task_id).submission_deadline + 1)
    flow.publish(running, 2, mask_of([1]))


# ---- pay: capped shares from a fixed pool


def test_colluders_score_is_capped_at_its_price_and_the_pool_still_goes_out(
    market: FlexMarket, accounts: Accounts, flow: Flow
):
    prices = [GWEI, GWEI, GWEI, GWEI]
    running = flow.start(rounds=1, trainer_prices_wei=prices)
    flow.run_round(running, 0, scores=[65535, 0, 0, 0])
    paid = trainer_pay(market.finalize(sender=accounts.outsider, task_id=running.task_id))
    colluder = running.trainers[0].address
    assert paid[colluder] == GWEI  # its price, not the whole pool of 2 gwei
    pool = sum(prices) // 2
    assert pool - len(prices) < sum(paid.values()) <= pool
    assert all(amount <= GWEI for amount in paid.values())


@pytest.mark.parametrize(
    "scores", [(1, 1, 1), (65535, 1, 1), (0, 0, 9), (10, 20, 30), (0, 65535, 0)]
)
def test_buyer_cannot_lower_its_bill_by_its_choice_of_validation_set(
    market: FlexMarket, accounts: Accounts, flow: Flow, scores
):
    prices = [GWEI, 2 * GWEI, 3 * GWEI]
    running = flow.start(rounds=1, trainer_prices_wei=prices)
    flow.run_round(running, 0, scores=list(scores))
    result = market.finalize(sender=accounts.outsider, task_id=running.task_id)
    paid = trainer_pay(result)
    # Whatever the scores, the round's trainer pool (half the valid updates' prices) is paid
    # out, less a few wei of rounding; no share exceeds its price.
    pool = sum(prices) // 2
    assert pool - 3 <= sum(paid.values()) <= pool
    for trainer, price in zip(running.trainers, prices, strict=True):
        assert paid.get(trainer.address, 0) <= price


def test_update_left_out_earns_nothing_and_the_pool_shrinks_only_by_its_share(
    market: FlexMarket, accounts: Accounts, flow: Flow
):
    prices = [GWEI, GWEI, GWEI]
    running = flow.start(rounds=1, trainer_prices_wei=prices)
    flow.run_round(running, 0, aggregate=[0, 1], scores=[1, 1])
    paid = trainer_pay(market.finalize(sender=accounts.outsider, task_id=running.task_id))
    assert running.trainers[2].address not in paid
    assert sum(paid.values()) == GWEI  # half of the two valid updates' prices


@settings(max_examples=300, deadline=None)
@given(
    prices=st.lists(st.integers(0, 2**96 - 1), min_size=1, max_size=12),
    data=st.data(),
)
def test_oracle_shares_never_exceed_prices_and_pay_the_whole_pool(prices, data):
    n = len(prices)
    mask = data.draw(st.integers(1, 2**n - 1))
    used = [p for p in range(n) if mask >> p & 1]
    scores = data.draw(
        st.lists(st.integers(0, 65535), min_size=len(used), max_size=len(used)).filter(any)
    )
    pay = round_pay(prices, mask, scores)
    pool = sum(prices[p] for p in used) // 2
    assert all(pay[p] <= prices[p] for p in range(n))
    assert all(pay[p] == 0 for p in range(n) if p not in used)
    assert pool - 2 * len(used) <= sum(pay) <= pool


# ---- stakes and bonds


def test_bid_must_pay_exactly_its_deposit(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = flow.create_task()
    info = market.task(task_id=task_id)
    assert info.trainer_stake_wei == info.budget_wei // (2 * info.rounds * info.max_trainers)
    assert info.aggregator_bond_wei == info.budget_wei // 2
    for deposit in (0, info.trainer_stake_wei - 1, info.trainer_stake_wei + 1):
        with pytest.raises(WrongDepositError) as exc:
            market.place_bid(
                sender=accounts.trainers[0],
                task_id=task_id,
                price_per_round_wei=MIN_TRAINER_PRICE_WEI,
                samples=10,
                role=Role.TRAINER,
                deposit_wei=deposit,
            )
        assert (exc.value.expected_wei, exc.value.got_wei) == (info.trainer_stake_wei, deposit)
    placed = market.place_bid(
        sender=accounts.trainers[0],
        task_id=task_id,
        price_per_round_wei=MIN_TRAINER_PRICE_WEI,
        samples=10,
        role=Role.TRAINER,
    ).first(BidPlaced)
    assert placed.deposit_wei == info.trainer_stake_wei
    assert market.task(task_id=task_id).stakes_held_wei == info.trainer_stake_wei
    assert market.balance_wei() == market.escrow_locked() + market.credits_owed()


def test_changing_role_pays_or_returns_the_difference(
    market: FlexMarket, accounts: Accounts, flow: Flow
):
    task_id = flow.create_task()
    info = market.task(task_id=task_id)
    device = accounts.aggregators[0]
    flow.bid_trainer(task_id, device, MIN_TRAINER_PRICE_WEI)
    due = market.deposit_due(task_id=task_id, device=device.address, role=Role.AGGREGATOR)
    assert due == info.aggregator_bond_wei - info.trainer_stake_wei
    flow.bid_aggregator(task_id, device, MIN_AGGREGATOR_PRICE_WEI)
    assert market.task(task_id=task_id).stakes_held_wei == info.aggregator_bond_wei
    result = market.place_bid(
        sender=device,
        task_id=task_id,
        price_per_round_wei=MIN_TRAINER_PRICE_WEI,
        samples=5,
        role=Role.TRAINER,
    )
    back = result.first(PaymentCredited)
    assert (back.account, back.amount_wei, back.reason) == (
        device.address,
        info.aggregator_bond_wei - info.trainer_stake_wei,
        CreditReason.STAKE_RETURNED,
    )
    assert market.task(task_id=task_id).stakes_held_wei == info.trainer_stake_wei


def test_buyer_cannot_aggregate_its_own_task(market: FlexMarket, accounts: Accounts, flow: Flow):
    market.register_device(
        sender=accounts.owner,
        device=accounts.buyer.address,
        device_class=DeviceClass.GPU,
        can_aggregate=True,
    )
    task_id = flow.create_task()
    with pytest.raises(BuyerCannotAggregateError) as exc:
        flow.bid_aggregator(task_id, accounts.buyer, MIN_AGGREGATOR_PRICE_WEI)
    assert (exc.value.task_id, exc.value.account) == (task_id, accounts.buyer.address)
    # It may still train for it (its data is its own).
    flow.bid_trainer(task_id, accounts.buyer, MIN_TRAINER_PRICE_WEI)


def test_withdrawn_bid_frees_its_slot_and_returns_the_stake(
    market: FlexMarket, accounts: Accounts, flow: Flow
):
    task_id = flow.create_task()
    stake = market.task(task_id=task_id).trainer_stake_wei
    first, second, third = accounts.trainers[:3]
    for trainer in (first, second, third):
        flow.bid_trainer(task_id, trainer, MIN_TRAINER_PRICE_WEI)
    with pytest.raises(NotBidderError):
        market.withdraw_bid(sender=accounts.outsider, task_id=task_id, device=first.address)
    result = market.withdraw_bid(sender=first, task_id=task_id)
    withdrawn = result.first(BidWithdrawn)
    assert (withdrawn.device, withdrawn.bid_index, withdrawn.moved_device) == (
        first.address,
        0,
        third.address,
    )
    assert result.first(PaymentCredited).amount_wei == stake
    assert [b.device for b in market.bids(task_id=task_id)] == [third.address, second.address]
    assert market.bid_index_of(task_id=task_id, device=third.address) == 0
    assert market.bid_index_of(task_id=task_id, device=first.address) is None
    with pytest.raises(NoBidError):
        market.withdraw_bid(sender=first, task_id=task_id)
    # A revoked bidder's slot can be freed by anyone.
    market.revoke_device(sender=accounts.owner, device=second.address)
    market.withdraw_bid(sender=accounts.outsider, task_id=task_id, device=second.address)
    assert [b.device for b in market.bids(task_id=task_id)] == [third.address]
    assert market.credit_of(account=second.address) == stake
    assert market.task(task_id=task_id).stakes_held_wei == stake


def test_after_selection_only_unselected_deposits_are_released_once(
    market: FlexMarket, accounts: Accounts, flow: Flow
):
    task_id = flow.create_task(max_trainers=1)
    stake = market.task(task_id=task_id).trainer_stake_wei
    flow.bid_aggregator(task_id, accounts.aggregators[0], MIN_AGGREGATOR_PRICE_WEI)
    flow.bid_trainer(task_id, accounts.trainers[0], MIN_TRAINER_PRICE_WEI, samples=100)
    flow.bid_trainer(task_id, accounts.trainers[1], MIN_TRAINER_PRICE_WEI, samples=10)
    flow.close_bidding(task_id)
    market.select_nodes(sender=accounts.outsider, task_id=task_id)
    for selected in (accounts.trainers[0], accounts.aggregators[0]):
        with pytest.raises(BidSelectedError):
            market.withdraw_bid(sender=selected, task_id=task_id)
    loser = accounts.trainers[1].address
    market.withdraw_bid(sender=accounts.outsider, task_id=task_id, device=loser)
    assert market.credit_of(account=loser) == stake
    with pytest.raises(NoBidError):
        market.withdraw_bid(sender=accounts.outsider, task_id=task_id, device=loser)
    assert len(market.bids(task_id=task_id)) == 3
