"""Escrow is conserved and nobody is paid twice, over random tasks, bids, rounds and timeouts:
payouts + refund + stakes returned + slashed stakes == budget + stakes, each as the plain
oracle in tests/chain/oracle.py computes it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from chain.client import FlexMarket
from chain.errors import InvalidTaskStateError, SubmissionClosedError
from chain.events import (
    CreditReason,
    DeviceStatus,
    NodesSelected,
    PaymentCredited,
    TaskFailed,
    TaskState,
)
from chain.selection import mask_of, plan_selection
from tests.chain.conftest import (
    MIN_AGGREGATOR_PRICE_WEI,
    MIN_TRAINER_PRICE_WEI,
    Accounts,
    Clock,
    Flow,
    Snapshots,
    model_id,
)
from tests.chain.oracle import round_pay, settle

MAX_BIDDERS = 5


@dataclass(frozen=True)
class Round:
    """What happens to the updates of one round, by trainer position."""

    on_time: tuple[bool, ...]
    late: tuple[bool, ...]
    aggregated: tuple[bool, ...]
    scores: tuple[int, ...] | None


@dataclass(frozen=True)
class Scenario:
    trainer_bids: tuple[tuple[int, int], ...]
    aggregator_prices: tuple[int, ...]
    rounds: int
    min_trainers: int
    max_trainers: int
    budget_wei: int
    revoked: int | None
    cancel: bool
    stall_at: int | None  # the first global model that never comes (then: abort)
    plays: tuple[Round, ...]


# Hypothesis leans towards the first choice of sampled_from (and towards False): the
# likely case goes first so that most tasks run to the end.
mostly_true = st.tuples(*[st.sampled_from([True, True, True, False])] * MAX_BIDDERS)
mostly_false = st.tuples(*[st.sampled_from([False, False, False, True])] * MAX_BIDDERS)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(1, MAX_BIDDERS))
    trainer_bids = tuple(
        (
            draw(st.integers(MIN_TRAINER_PRICE_WEI, 6 * MIN_TRAINER_PRICE_WEI)),
            draw(st.integers(1, 1000)),
        )
        for _ in range(n)
    )
    # Mostly one or two aggregator bids: a task without any is a quick failure to cover,
    # not the common case.
    aggregators = draw(st.sampled_from([1, 1, 1, 2, 2, 0]))
    aggregator_prices = tuple(
        draw(st.integers(MIN_AGGREGATOR_PRICE_WEI, 4 * MIN_AGGREGATOR_PRICE_WEI))
        for _ in range(aggregators)
    )
    rounds = draw(st.integers(1, 3))
    min_trainers = draw(st.sampled_from([1, 1, (n + 1) // 2, n]))
    max_trainers = draw(st.integers(min_trainers, MAX_BIDDERS))
    minimum = rounds * (min_trainers * MIN_TRAINER_PRICE_WEI + MIN_AGGREGATOR_PRICE_WEI)
    # From the contract's minimum to more than every bid could cost, in coarse steps so that
    # both starved and comfortable tasks come up often.
    dearest = sorted((price for price, _ in trainer_bids), reverse=True)[:max_trainers]
    ample = rounds * (sum(dearest) + max(aggregator_prices, default=0))
    step = draw(st.sampled_from([4, 5, 4, 3, 2, 1, 0]))
    budget = max(minimum, minimum + (ample - minimum) * step // 4) + draw(st.integers(0, 999))
    plays = tuple(
        Round(
            on_time=draw(mostly_true),
            late=draw(mostly_false),
            aggregated=draw(mostly_true),
            scores=draw(st.none() | st.tuples(*[st.integers(0, 2**16 - 1)] * MAX_BIDDERS)),
        )
        for _ in range(rounds)
    )
    return Scenario(
        trainer_bids=trainer_bids,
        aggregator_prices=aggregator_prices,
        rounds=rounds,
        min_trainers=min_trainers,
        max_trainers=max_trainers,
        budget_wei=budget,
        revoked=draw(st.sampled_from([None, None, None, None, 0, n - 1])),
        cancel=draw(st.sampled_from(range(10))) == 9,
        stall_at=draw(st.sampled_from([None, None, None, *range(rounds + 1)])),
        plays=plays,
    )


class Checker:
    """Asserts the escrow invariant after every step and keeps the expected payouts."""

    def __init__(self, market: FlexMarket, accounts: Accounts) -> None:
        self.market = market
        self.accounts = accounts

    def conserved(self) -> None:
        m = self.market
        assert m.balance_wei() == m.credits_owed() + m.escrow_locked()

    def credits_sum(self) -> int:
        return sum(self.market.credit_of(account=a.address) for a in self.accounts.all())


def play(scenario: Scenario, market: FlexMarket, accounts: Accounts, flow: Flow, clock: Clock):
    check = Checker(market, accounts)
    owed_before = check.credits_sum()
    buyer = accounts.buyer
    task_id = flow.create_task(
        rounds=scenario.rounds,
        min_trainers=scenario.min_trainers,
        max_trainers=scenario.max_trainers,
        budget_wei=scenario.budget_wei,
    )
    check.conserved()
    for aggregator, price in zip(accounts.aggregators, scenario.aggregator_prices, strict=False):
        flow.bid_aggregator(task_id, aggregator, price)
    bidders = accounts.trainers[: len(scenario.trainer_bids)]
    for trainer, (price, samples) in zip(bidders, scenario.trainer_bids, strict=True):
        flow.bid_trainer(task_id, trainer, price, samples)
    if scenario.revoked is not None:
        market.revoke_device(sender=accounts.owner, device=bidders[scenario.revoked].address)
    check.conserved()

    deposits = market.task(task_id=task_id).stakes_held_wei

    def release_unselected(selected_nodes: set[str]) -> None:
        """Anyone releases the deposits of bids that were not selected, once each."""
        for b in market.bids(task_id=task_id):
            if b.device not in selected_nodes:
                market.withdraw_bid(sender=accounts.outsider, task_id=task_id, device=b.device)
        check.conserved()

    if scenario.cancel:
        market.cancel_task(sender=buyer, task_id=task_id)
        event("cancelled")
        check.conserved()
        assert check.credits_sum() - owed_before == scenario.budget_wei
        release_unselected(set())
        assert check.credits_sum() - owed_before == scenario.budget_wei + deposits
        assert market.escrow_locked() == 0
        return

    flow.close_bidding(task_id)
    bids = market.bids(task_id=task_id)
    devices = {b.device: market.device(device=b.device) for b in bids}
    plan = plan_selection(
        bids=bids,
        rounds=scenario.rounds,
        budget_wei=scenario.budget_wei,
        min_trainers=scenario.min_trainers,
        max_trainers=scenario.max_trainers,
        seed=market.next_selection_seed(task_id=task_id),
        devices=devices,
    )
    result = market.select_nodes(sender=accounts.outsider, task_id=task_id)
    check.conserved()
    if plan.failure is not None:
        event(f"failed: {plan.failure.name}")
        assert result.first(TaskFailed).reason == plan.failure
        assert check.credits_sum() - owed_before == scenario.budget_wei
        assert market.credit_of(account=buyer.address) == scenario.budget_wei
        release_unselected(set())
        assert check.credits_sum() - owed_before == scenario.budget_wei + deposits
        assert market.escrow_locked() == 0
        return
    selected = result.first(NodesSelected)
    assert selected.trainers == tuple(bids[i].device for i in plan.trainer_indices)
    assert all(devices[t].status == DeviceStatus.ACTIVE for t in selected.trainers)
    by_address = {a.address: a for a in accounts.all()}
    trainers = [by_address[t] for t in selected.trainers]
    aggregator = by_address[selected.aggregator]
    prices = list(selected.trainer_prices_wei)
    n = len(trainers)

    def publish(round_number: int, mask: int, scores: tuple[int, ...]) -> None:
        market.publish_global_model(
            sender=aggregator,
            task_id=task_id,
            round_number=round_number,
            model_id=model_id(f"p-{task_id}-{round_number}"),
            aggregated_mask=mask,
            scores=scores,
        )
        check.conserved()

    release_unselected({*selected.trainers, selected.aggregator})
    aggregated: list[tuple[int, tuple[int, ...] | None]] = []
    submitted_by_round: list[int] = []
    published = 0
    submitted = 0
    stall = scenario.stall_at
    for round_number in range(scenario.rounds + 1):
        if stall == round_number:
            break
        if round_number == 0:
            publish(0, 0, ())
        else:
            play_ = scenario.plays[round_number - 1]
            mask = submitted & mask_of(p for p in range(n) if play_.aggregated[p])
            if mask == 0:  # nothing to aggregate: the aggregator cannot publish
                stall = round_number
                break
            used = [p for p in range(n) if mask >> p & 1]
            scores = None if play_.scores is None else tuple(play_.scores[p] for p in used)
            if scores is not None and sum(scores) == 0:
                scores = None
            if submitted != mask_of(range(n)):
                clock.mine_at(
                    max(clock.now(), market.task(task_id=task_id).submission_deadline) + 1
                )
            publish(round_number, mask, scores or ())
            aggregated.append((mask, scores))
        published = round_number + 1
        if round_number == scenario.rounds:
            break
        play_ = scenario.plays[round_number]
        submitted = 0
        for p in range(n):
            if play_.on_time[p]:
                flow.market.submit_update(
                    sender=trainers[p],
                    task_id=task_id,
                    round_number=round_number,
                    model_id=model_id(f"u-{task_id}-{round_number}-{p}"),
                )
                submitted |= 1 << p
        submitted_by_round.append(submitted)
        late = [p for p in range(n) if play_.late[p] and not play_.on_time[p]]
        if late:
            clock.mine_at(market.task(task_id=task_id).submission_deadline + 1)
            for p in late:
                with pytest.raises(SubmissionClosedError):
                    market.submit_update(
                        sender=trainers[p],
                        task_id=task_id,
                        round_number=round_number,
                        model_id=model_id("late"),
                    )
        check.conserved()

    info = market.task(task_id=task_id)
    stake, bond = info.trainer_stake_wei, info.aggregator_bond_wei
    put_in = scenario.budget_wei + n * stake + bond
    owed_before = check.credits_sum()
    if stall is None:
        assert info.state == TaskState.TRAINED
        result = market.finalize(sender=accounts.outsider, task_id=task_id)
        event(f"finalized, scored rounds: {sum(s is not None for _, s in aggregated) > 0}")
    else:
        clock.mine_at(info.publish_deadline + 1)
        result = market.abort(sender=accounts.outsider, task_id=task_id)
        event(f"aborted after {published} global models")
    check.conserved()
    expected = settle(
        budget=scenario.budget_wei,
        buyer=buyer.address,
        aggregator=aggregator.address,
        aggregator_price=selected.aggregator_price_wei,
        trainers=[t.address for t in trainers],
        prices=prices,
        stake=stake,
        bond=bond,
        aggregated=aggregated,
        submitted=submitted_by_round,
        aborted=stall is not None,
    )

    credited = result.all(PaymentCredited)
    assert {(c.account, c.reason): c.amount_wei for c in credited} == expected.credits
    assert len({(c.account, c.reason) for c in credited}) == len(credited)
    # Conservation: payouts + refund + stakes back + slashed stakes == budget + stakes.
    assert sum(c.amount_wei for c in credited) == expected.total() == put_in
    for p, trainer in enumerate(trainers):
        assert expected.credits.get((trainer.address, CreditReason.TRAINER_PAY), 0) <= sum(
            prices[p] for _ in aggregated
        )
    assert check.credits_sum() - owed_before == put_in
    assert market.escrow_locked() == 0

    # Settling again is refused and changes nothing.
    for settle_again in (market.finalize, market.abort):
        with pytest.raises(InvalidTaskStateError):
            settle_again(sender=accounts.outsider, task_id=task_id)
    assert check.credits_sum() - owed_before == put_in

    for account in accounts.all():
        if market.credit_of(account=account.address):
            market.withdraw(sender=account)
            check.conserved()
    assert market.balance_wei() == 0


@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_escrow_is_conserved_and_paid_once(
    scenario: Scenario,
    market: FlexMarket,
    accounts: Accounts,
    flow: Flow,
    clock: Clock,
    snapshots: Snapshots,
):
    # The autouse snapshot wraps the whole test, not each example: take one per example.
    snapshot = snapshots.take()
    try:
        play(scenario, market, accounts, flow, clock)
    finally:
        snapshots.revert(snapshot)


def test_oracle_round_pay_rule():
    prices = [10, 20, 30]
    assert round_pay(prices, 0b111, None) == [5, 10, 15]  # unscored: half of each price
    assert round_pay(prices, 0b011, (1, 2)) == [5, 10, 0]  # pool 15 shared 1:2
    # Pool 30; scores 0:0:1 would give position 2 all 30 = its price: nothing capped.
    assert round_pay(prices, 0b111, (0, 0, 1)) == [0, 0, 30]
    # Pool 30 shared 0:1:0 caps position 1 at 20; the 10 held back goes by headroom 10:0:30.
    assert round_pay(prices, 0b111, (0, 1, 0)) == [2, 20, 7]
