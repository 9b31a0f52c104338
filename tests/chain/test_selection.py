"""selectNodes: the aggregator and trainer rules, the sort hint, and failed selections."""

from __future__ import annotations

import pytest

from chain.client import FlexMarket
from chain.errors import (
    BiddingOpenError,
    InvalidHintError,
    InvalidHintLengthError,
    InvalidTaskStateError,
)
from chain.events import (
    CreditReason,
    FailureReason,
    NodesSelected,
    PaymentCredited,
    Role,
    TaskFailed,
    TaskState,
)
from chain.records import BidInfo
from chain.selection import plan_selection, selection_order, selection_seed, tie_key
from tests.chain.conftest import (
    MIN_AGGREGATOR_PRICE_WEI,
    MIN_TRAINER_PRICE_WEI,
    ROUND_TIMEOUT,
    Accounts,
    Flow,
)

GWEI = 10**9
SEED = b"\x5e" * 32


def bid(index: int, price: int, samples: int, role: Role = Role.TRAINER) -> BidInfo:
    return BidInfo(
        index=index, device=f"d{index}", price_per_round_wei=price, samples=samples, role=role
    )


def test_selection_order_is_price_per_sample_then_tie_key():
    bids = [
        bid(0, 3, 1),  # 3 per sample
        bid(1, 10, 0, Role.AGGREGATOR),
        bid(2, 1, 3),  # 1/3
        bid(3, 333_333, 1_000_000),  # just below 1/3
        bid(4, 2, 6),  # 1/3, tie with 2: the seed decides
        bid(5, 2, 2),  # 1
    ]
    tied = sorted([2, 4], key=lambda i: tie_key(SEED, i))
    assert selection_order(bids, seed=SEED) == [3, *tied, 5, 0]
    # Another seed may order the tie the other way; bid order never decides it.
    orders = {tuple(selection_order(bids, seed=bytes([b]) * 32)[1:3]) for b in range(16)}
    assert orders == {(2, 4), (4, 2)}


def test_plan_selection_skips_a_trainer_that_does_not_fit():
    bids = [
        bid(0, 2, 0, Role.AGGREGATOR),
        bid(1, 5, 1000),
        bid(2, 3, 100),
        bid(3, 1, 10),
    ]
    plan = plan_selection(
        bids=bids, rounds=1, budget_wei=8, min_trainers=1, max_trainers=3, seed=SEED
    )
    assert plan.aggregator_index == 0
    assert plan.trainer_indices == (1, 3)
    assert plan.failure is None


def setup_bids(
    flow: Flow,
    accounts: Accounts,
    trainer_bids,
    *,
    aggregator_prices=(MIN_AGGREGATOR_PRICE_WEI,),
    **task,
):
    task_id = flow.create_task(**task)
    for aggregator, price in zip(accounts.aggregators, aggregator_prices, strict=False):
        flow.bid_aggregator(task_id, aggregator, price)
    for trainer, (price, samples) in zip(accounts.trainers, trainer_bids, strict=False):
        flow.bid_trainer(task_id, trainer, price, samples)
    return task_id


def test_select_nodes_before_deadline(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = setup_bids(flow, accounts, [(GWEI, 10)])
    with pytest.raises(BiddingOpenError) as exc:
        market.select_nodes(sender=accounts.outsider, task_id=task_id)
    assert exc.value.task_id == task_id


def test_select_nodes_picks_cheapest_per_sample(market: FlexMarket, accounts: Accounts, flow: Flow):
    # per sample: t0 0.05, t1 0.01, t2 0.02, t3 0.1 gwei; max 3 trainers.
    prices = [(5 * GWEI, 100), (10 * GWEI, 1000), (2 * GWEI, 100), (GWEI, 10)]
    task_id = setup_bids(flow, accounts, prices, max_trainers=3, rounds=2, budget_wei=10**18)
    flow.close_bidding(task_id)
    result = market.select_nodes(sender=accounts.outsider, task_id=task_id)
    event = result.first(NodesSelected)
    t = accounts.trainers
    assert event.aggregator == accounts.aggregators[0].address
    assert event.aggregator_price_wei == MIN_AGGREGATOR_PRICE_WEI
    assert event.trainers == (t[1].address, t[2].address, t[0].address)
    assert event.trainer_prices_wei == (10 * GWEI, 2 * GWEI, 5 * GWEI)
    info = market.task(task_id=task_id)
    assert info.state == TaskState.RUNNING
    assert info.trainer_count == 3
    assert info.publish_deadline == info.phase_start + ROUND_TIMEOUT
    assert info.submission_deadline == 0
    assert market.trainer_position(task_id=task_id, device=t[2].address) == 1
    assert market.trainer_position(task_id=task_id, device=t[3].address) is None
    selection = market.selection(task_id=task_id)
    assert selection is not None
    assert selection.trainers == event.trainers
    assert selection.trainer_prices_wei == event.trainer_prices_wei
    assert selection.trainer_samples == (1000, 100, 100)


def test_the_selection_weighs_each_trainer_by_its_claim_capped_at_the_tasks_cap(
    market: FlexMarket, accounts: Accounts, flow: Flow
):
    # What every round's weights (the aggregator's, a watcher's, a challenge's) are read from:
    # a trainer that claims more samples than the task allows weighs no more than the cap.
    task_id = setup_bids(
        flow, accounts, [(GWEI, 5000), (GWEI, 40)], sample_cap=300, budget_wei=10**18
    )
    flow.close_bidding(task_id)
    market.select_nodes(sender=accounts.outsider, task_id=task_id)
    selection = market.selection(task_id=task_id)
    t = accounts.trainers
    assert selection.samples == {t[0].address: 300, t[1].address: 40}
    assert selection.samples == {
        b.device: b.samples for b in market.bids(task_id=task_id) if b.device in selection.trainers
    }


def test_aggregator_tie_goes_by_the_seed_drawn_at_selection_not_by_who_bid_first(
    market: FlexMarket, accounts: Accounts, flow: Flow, clock
):
    winners = set()
    for _ in range(8):
        task_id = setup_bids(flow, accounts, [(GWEI, 10)], aggregator_prices=(3 * GWEI, 3 * GWEI))
        flow.close_bidding(task_id)
        clock.advance(1)
        event = market.select_nodes(sender=accounts.outsider, task_id=task_id).first(NodesSelected)
        block = market.w3.eth.get_block(event.block_number)
        seed = event.seed
        assert bytes.fromhex(seed[2:]) == selection_seed(
            parent_hash=block["parentHash"], task_id=task_id
        )
        first = min((0, 1), key=lambda i: tie_key(seed, i))
        assert event.aggregator == accounts.aggregators[first].address
        winners.add(event.aggregator)
    # Bidding first (index 0) is no way to win: over a few draws both aggregators win.
    assert winners == {a.address for a in accounts.aggregators}


def test_select_nodes_cheaper_aggregator_wins(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = setup_bids(flow, accounts, [(GWEI, 10)], aggregator_prices=(4 * GWEI, 3 * GWEI))
    flow.close_bidding(task_id)
    result = market.select_nodes(sender=accounts.outsider, task_id=task_id)
    assert result.first(NodesSelected).aggregator == accounts.aggregators[1].address


def test_select_nodes_skips_trainer_over_budget_and_takes_a_later_one(
    market: FlexMarket, accounts: Accounts, flow: Flow
):
    # rounds=1, aggregator 2 gwei; order t0 (5), t1 (3), t2 (1); budget 8 gwei: t1 is skipped.
    prices = [(5 * GWEI, 1000), (3 * GWEI, 100), (GWEI, 10)]
    task_id = setup_bids(flow, accounts, prices, rounds=1, max_trainers=3, budget_wei=8 * GWEI)
    flow.close_bidding(task_id)
    result = market.select_nodes(sender=accounts.outsider, task_id=task_id)
    t = accounts.trainers
    assert result.first(NodesSelected).trainers == (t[0].address, t[2].address)


def test_select_nodes_skips_revoked_devices(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = setup_bids(
        flow, accounts, [(GWEI, 100), (GWEI, 10)], aggregator_prices=(2 * GWEI, 3 * GWEI)
    )
    market.revoke_device(sender=accounts.owner, device=accounts.trainers[0].address)
    market.revoke_device(sender=accounts.owner, device=accounts.aggregators[0].address)
    flow.close_bidding(task_id)
    event = market.select_nodes(sender=accounts.outsider, task_id=task_id).first(NodesSelected)
    assert event.aggregator == accounts.aggregators[1].address
    assert event.trainers == (accounts.trainers[1].address,)


@pytest.mark.parametrize(
    ("order", "position", "bid_index"),
    [
        ([2, 1], 1, 1),  # descending
        ([1, 1], 1, 1),  # duplicate
        ([0, 2], 0, 0),  # the aggregator's bid
        ([1, 7], 1, 7),  # out of range
    ],
    ids=["out-of-order", "duplicate", "aggregator-bid", "out-of-range"],
)
def test_select_nodes_rejects_a_wrong_hint(
    market: FlexMarket, accounts: Accounts, flow: Flow, order, position, bid_index
):
    # bid 0 aggregator, bid 1 cheaper per sample than bid 2.
    task_id = setup_bids(flow, accounts, [(GWEI, 100), (GWEI, 10)])
    flow.close_bidding(task_id)
    with pytest.raises(InvalidHintError) as exc:
        market.select_nodes(sender=accounts.outsider, task_id=task_id, order=order)
    assert (exc.value.position, exc.value.bid_index) == (position, bid_index)


@pytest.mark.parametrize("order", [[1], [1, 2, 2]])
def test_select_nodes_rejects_a_hint_of_the_wrong_length(
    market: FlexMarket, accounts: Accounts, flow: Flow, order
):
    task_id = setup_bids(flow, accounts, [(GWEI, 100), (GWEI, 10)])
    flow.close_bidding(task_id)
    with pytest.raises(InvalidHintLengthError) as exc:
        market.select_nodes(sender=accounts.outsider, task_id=task_id, order=order)
    assert (exc.value.expected, exc.value.got) == (2, len(order))


def test_select_nodes_accepts_the_computed_hint(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = setup_bids(flow, accounts, [(GWEI, 100), (GWEI, 10)])
    flow.close_bidding(task_id)
    seed = market.next_selection_seed(task_id=task_id)
    order = selection_order(market.bids(task_id=task_id), seed=seed)
    assert order == [1, 2]
    market.select_nodes(sender=accounts.outsider, task_id=task_id, order=order)


def assert_failed(market, accounts, result, task_id, reason, selectable, budget):
    failed = result.first(TaskFailed)
    assert (failed.task_id, failed.reason, failed.selectable_trainers) == (
        task_id,
        reason,
        selectable,
    )
    credit = result.first(PaymentCredited)
    assert (credit.account, credit.amount_wei, credit.reason) == (
        accounts.buyer.address,
        budget,
        CreditReason.REFUND,
    )
    info = market.task(task_id=task_id)
    assert info.state == TaskState.FAILED
    # The bidders' deposits stay in escrow until each bid is withdrawn.
    assert market.escrow_locked() == info.stakes_held_wei
    assert market.credit_of(account=accounts.buyer.address) == budget
    assert market.balance_wei() == budget + info.stakes_held_wei
    for b in market.bids(task_id=task_id):
        market.withdraw_bid(sender=accounts.outsider, task_id=task_id, device=b.device)
    assert market.escrow_locked() == 0
    assert market.balance_wei() == market.credits_owed()


def test_selection_fails_without_aggregator(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = setup_bids(flow, accounts, [(GWEI, 10)], aggregator_prices=(), budget_wei=10**16)
    flow.close_bidding(task_id)
    result = market.select_nodes(sender=accounts.outsider, task_id=task_id)
    assert_failed(market, accounts, result, task_id, FailureReason.NO_AGGREGATOR, 0, 10**16)


def test_selection_fails_with_no_bids_at_all(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = flow.create_task(budget_wei=10**16)
    flow.close_bidding(task_id)
    result = market.select_nodes(sender=accounts.outsider, task_id=task_id, order=[])
    assert_failed(market, accounts, result, task_id, FailureReason.NO_AGGREGATOR, 0, 10**16)


def test_selection_fails_when_aggregator_over_budget(
    market: FlexMarket, accounts: Accounts, flow: Flow
):
    budget = 2 * (MIN_TRAINER_PRICE_WEI + MIN_AGGREGATOR_PRICE_WEI)
    task_id = setup_bids(
        flow, accounts, [(GWEI, 10)], aggregator_prices=(10**17,), rounds=2, budget_wei=budget
    )
    flow.close_bidding(task_id)
    result = market.select_nodes(sender=accounts.outsider, task_id=task_id)
    assert_failed(
        market, accounts, result, task_id, FailureReason.AGGREGATOR_OVER_BUDGET, 0, budget
    )


def test_selection_fails_with_too_few_affordable_trainers(
    market: FlexMarket, accounts: Accounts, flow: Flow
):
    # Two rounds; the budget pays the aggregator and two 1-gwei trainers, the second
    # trainer asks 10 gwei, so only one is affordable and two are needed.
    budget = 2 * (MIN_AGGREGATOR_PRICE_WEI + 2 * MIN_TRAINER_PRICE_WEI)
    task_id = setup_bids(
        flow,
        accounts,
        [(GWEI, 10), (10 * GWEI, 10)],
        rounds=2,
        min_trainers=2,
        max_trainers=2,
        budget_wei=budget,
    )
    flow.close_bidding(task_id)
    result = market.select_nodes(sender=accounts.outsider, task_id=task_id)
    assert_failed(market, accounts, result, task_id, FailureReason.TOO_FEW_TRAINERS, 1, budget)


def test_selection_with_fewer_trainers_than_max_but_enough(
    market: FlexMarket, accounts: Accounts, flow: Flow
):
    budget = MIN_AGGREGATOR_PRICE_WEI + GWEI
    task_id = setup_bids(
        flow,
        accounts,
        [(GWEI, 10), (5 * GWEI, 10)],
        rounds=1,
        min_trainers=1,
        max_trainers=2,
        budget_wei=budget,
    )
    flow.close_bidding(task_id)
    result = market.select_nodes(sender=accounts.outsider, task_id=task_id)
    assert result.first(NodesSelected).trainers == (accounts.trainers[0].address,)


def test_select_nodes_twice(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = setup_bids(flow, accounts, [(GWEI, 10)])
    flow.close_bidding(task_id)
    market.select_nodes(sender=accounts.outsider, task_id=task_id)
    with pytest.raises(InvalidTaskStateError) as exc:
        market.select_nodes(sender=accounts.outsider, task_id=task_id)
    assert exc.value.state == TaskState.RUNNING


def test_select_nodes_matches_the_off_chain_plan(
    market: FlexMarket, accounts: Accounts, flow: Flow
):
    prices = [(3 * GWEI, 70), (2 * GWEI, 20), (7 * GWEI, 300), (GWEI, 7), (4 * GWEI, 90)]
    budget = 3 * (MIN_AGGREGATOR_PRICE_WEI + 9 * GWEI)
    task_id = setup_bids(flow, accounts, prices, rounds=3, max_trainers=4, budget_wei=budget)
    flow.close_bidding(task_id)
    bids = market.bids(task_id=task_id)
    event = market.select_nodes(sender=accounts.outsider, task_id=task_id).first(NodesSelected)
    plan = plan_selection(
        bids=bids, rounds=3, budget_wei=budget, min_trainers=1, max_trainers=4, seed=event.seed
    )
    assert event.aggregator == bids[plan.aggregator_index].device
    assert event.trainers == tuple(bids[i].device for i in plan.trainer_indices)
