"""Finalize, abort, pull payments and the reentrancy guard, with exact wei arithmetic."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_utils import keccak
from web3 import Web3

from chain.client import FlexMarket
from chain.errors import (
    DeadlineNotPassedError,
    InvalidTaskStateError,
    NothingToWithdrawError,
    ReentrantCallError,
    TransferFailedError,
)
from chain.events import (
    CreditReason,
    DeviceClass,
    PaymentCredited,
    TaskAborted,
    TaskCreated,
    TaskFinalized,
    TaskState,
    Withdrawn,
)
from chain.selection import mask_of
from chain.transactions import call_artifact, decode_revert, deploy_artifact, transact_artifact
from tests.chain.conftest import (
    MIN_AGGREGATOR_PRICE_WEI,
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


def credits_by_account(events) -> dict[tuple[str, CreditReason], int]:
    return {(e.account, e.reason): e.amount_wei for e in events if isinstance(e, PaymentCredited)}


def assert_conserved(market: FlexMarket) -> None:
    assert market.balance_wei() == market.credits_owed() + market.escrow_locked()


def test_full_lifecycle_exact_payouts(market: FlexMarket, accounts: Accounts, flow: Flow, w3: Web3):
    p = [GWEI, 2 * GWEI, 3 * GWEI]
    agg = MIN_AGGREGATOR_PRICE_WEI
    running = flow.start(rounds=3, trainer_prices_wei=p, aggregator_price_wei=agg)
    budget = running.budget_wei
    assert budget == 3 * (sum(p) + agg) + 12_345
    assert running.prices_wei == p
    info = market.task(task_id=running.task_id)
    stake, bond = info.trainer_stake_wei, info.aggregator_bond_wei
    assert (stake, bond) == (budget // (2 * 3 * 3), budget // 2)
    assert info.stakes_held_wei == 3 * stake + bond
    t0, t1, t2 = (t.address for t in running.trainers)

    flow.run_round(running, 0)  # everyone aggregated, unscored: each half its price
    flow.run_round(running, 1, submit=[0, 1], scores=[2, 7])  # pool 1.5 gwei shared 2:7
    flow.run_round(running, 2, aggregate=[1, 2])  # t0 submitted but was left out
    assert_conserved(market)

    share0 = (3 * GWEI // 2) * 2 // 9  # 333_333_333
    share1 = (3 * GWEI // 2) * 7 // 9  # 1_166_666_666; one wei of dust stays with the buyer
    expected = {
        (t0, CreditReason.TRAINER_PAY): p[0] // 2 + share0,
        (t1, CreditReason.TRAINER_PAY): p[1] // 2 + share1 + p[1] // 2,
        (t2, CreditReason.TRAINER_PAY): p[2] // 2 + p[2] // 2,
        (running.aggregator.address, CreditReason.AGGREGATOR_PAY): 3 * agg,
        (t0, CreditReason.STAKE_RETURNED): stake,
        (t1, CreditReason.STAKE_RETURNED): stake,
        (running.aggregator.address, CreditReason.STAKE_RETURNED): bond,
        # t2 missed round 1: its stake goes to the buyer.
        (accounts.buyer.address, CreditReason.STAKE_SLASHED): stake,
    }
    trainers_paid = sum(v for (_, r), v in expected.items() if r == CreditReason.TRAINER_PAY)
    refund = budget - trainers_paid - 3 * agg
    expected[(accounts.buyer.address, CreditReason.REFUND)] = refund

    result = market.finalize(sender=accounts.outsider, task_id=running.task_id)
    final = result.first(TaskFinalized)
    assert (
        final.trainers_paid_wei,
        final.aggregator_paid_wei,
        final.refunded_wei,
        final.slashed_wei,
    ) == (trainers_paid, 3 * agg, refund, stake)
    assert credits_by_account(result.events) == expected
    assert sum(expected.values()) == budget + 3 * stake + bond
    assert market.task(task_id=running.task_id).state == TaskState.FINALIZED
    assert market.task(task_id=running.task_id).stakes_held_wei == 0
    assert market.escrow_locked() == 0
    assert market.credits_owed() == budget + 3 * stake + bond
    assert_conserved(market)

    for account in [*running.trainers, running.aggregator, accounts.buyer]:
        owed = market.credit_of(account=account.address)
        before = w3.eth.get_balance(account.address)
        withdrawal = market.withdraw(sender=account)
        assert withdrawal.first(Withdrawn).amount_wei == owed
        after = w3.eth.get_balance(account.address)
        assert after == before + owed - withdrawal.fee_wei
        assert market.credit_of(account=account.address) == 0
    assert market.balance_wei() == 0
    assert market.credits_owed() == 0


def test_finalize_before_the_last_round(
    market: FlexMarket, accounts: Accounts, flow: Flow, running: Running
):
    flow.run_round(running, 0)
    with pytest.raises(InvalidTaskStateError) as exc:
        market.finalize(sender=accounts.outsider, task_id=running.task_id)
    assert (exc.value.task_id, exc.value.state) == (running.task_id, TaskState.RUNNING)


def test_finalize_twice_pays_once(
    market: FlexMarket, accounts: Accounts, flow: Flow, running: Running
):
    flow.run_round(running, 0)
    flow.run_round(running, 1)
    market.finalize(sender=accounts.outsider, task_id=running.task_id)
    owed = market.credits_owed()
    with pytest.raises(InvalidTaskStateError) as exc:
        market.finalize(sender=accounts.outsider, task_id=running.task_id)
    assert exc.value.state == TaskState.FINALIZED
    with pytest.raises(InvalidTaskStateError):
        market.abort(sender=accounts.outsider, task_id=running.task_id)
    info = market.task(task_id=running.task_id)
    deposits = info.trainer_count * info.trainer_stake_wei + info.aggregator_bond_wei
    assert market.credits_owed() == owed == running.budget_wei + deposits


def test_abort_before_the_deadline(market: FlexMarket, accounts: Accounts, running: Running):
    deadline = market.task(task_id=running.task_id).publish_deadline
    with pytest.raises(DeadlineNotPassedError) as exc:
        market.abort(sender=accounts.outsider, task_id=running.task_id)
    assert (exc.value.task_id, exc.value.deadline) == (running.task_id, deadline)


def test_abort_pays_what_was_aggregated_and_slashes_the_late_aggregator(
    market: FlexMarket, accounts: Accounts, flow: Flow, clock: Clock
):
    p = [GWEI, 2 * GWEI, 3 * GWEI]
    agg = MIN_AGGREGATOR_PRICE_WEI
    running = flow.start(rounds=3, trainer_prices_wei=p, aggregator_price_wei=agg)
    info = market.task(task_id=running.task_id)
    stake, bond = info.trainer_stake_wei, info.aggregator_bond_wei
    t0, t1, t2 = (t.address for t in running.trainers)
    flow.run_round(running, 0, aggregate=[0, 1])  # t2's round-0 update not used
    flow.submit(running, 1, [0, 2])  # on time in the open round; never acknowledged
    deadline = market.task(task_id=running.task_id).publish_deadline
    clock.mine_at(deadline)
    with pytest.raises(DeadlineNotPassedError):
        market.abort(sender=accounts.outsider, task_id=running.task_id)
    clock.mine_at(deadline + 1)

    result = market.abort(sender=accounts.outsider, task_id=running.task_id)
    trainers_paid = p[0] // 2 + p[1] // 2
    refund = running.budget_wei - trainers_paid - agg
    # t1 missed the open round; t0 and t2 share half the bond, the buyer gets the rest.
    bond_share = bond // 2 // 2
    slashed = stake + bond
    aborted = result.first(TaskAborted)
    assert (aborted.task_id, aborted.published_rounds) == (running.task_id, 2)
    assert (
        aborted.trainers_paid_wei,
        aborted.aggregator_paid_wei,
        aborted.refunded_wei,
        aborted.slashed_wei,
    ) == (trainers_paid, agg, refund, slashed)
    assert credits_by_account(result.events) == {
        (t0, CreditReason.TRAINER_PAY): p[0] // 2,
        (t1, CreditReason.TRAINER_PAY): p[1] // 2,
        (t0, CreditReason.STAKE_RETURNED): stake,
        (t2, CreditReason.STAKE_RETURNED): stake,
        (t0, CreditReason.STAKE_SLASHED): bond_share,
        (t2, CreditReason.STAKE_SLASHED): bond_share,
        (running.aggregator.address, CreditReason.AGGREGATOR_PAY): agg,
        (accounts.buyer.address, CreditReason.REFUND): refund,
        (accounts.buyer.address, CreditReason.STAKE_SLASHED): slashed - 2 * bond_share,
    }
    assert market.task(task_id=running.task_id).state == TaskState.ABORTED
    assert market.escrow_locked() == 0
    assert_conserved(market)
    with pytest.raises(InvalidTaskStateError) as exc:
        market.abort(sender=accounts.outsider, task_id=running.task_id)
    assert exc.value.state == TaskState.ABORTED


def test_no_show_aggregator_bond_goes_to_the_buyer_and_the_trainers(
    market: FlexMarket, accounts: Accounts, flow: Flow, clock: Clock
):
    running = flow.start(publish_round_zero=False)
    info = market.task(task_id=running.task_id)
    stake, bond = info.trainer_stake_wei, info.aggregator_bond_wei
    clock.advance(ROUND_TIMEOUT + 1)
    result = market.abort(sender=accounts.trainers[0], task_id=running.task_id)
    share = bond // 2 // 3
    expected = {(accounts.buyer.address, CreditReason.REFUND): running.budget_wei}
    for trainer in running.trainers:
        expected[(trainer.address, CreditReason.STAKE_RETURNED)] = stake
        expected[(trainer.address, CreditReason.STAKE_SLASHED)] = share
    expected[(accounts.buyer.address, CreditReason.STAKE_SLASHED)] = bond - 3 * share
    assert credits_by_account(result.events) == expected
    assert market.credit_of(account=running.aggregator.address) == 0
    assert_conserved(market)


def test_abort_is_not_for_trained_tasks(
    market: FlexMarket, accounts: Accounts, flow: Flow, clock: Clock, running: Running
):
    flow.run_round(running, 0)
    flow.run_round(running, 1)
    clock.advance(10 * ROUND_TIMEOUT)
    with pytest.raises(InvalidTaskStateError) as exc:
        market.abort(sender=accounts.outsider, task_id=running.task_id)
    assert exc.value.state == TaskState.TRAINED


def test_revoked_trainer_is_still_paid_for_what_it_delivered(
    market: FlexMarket, accounts: Accounts, flow: Flow, running: Running
):
    flow.submit(running, 0, [0, 1, 2])
    market.revoke_device(sender=accounts.owner, device=running.trainers[0].address)
    flow.publish(running, 1, running.everyone)
    flow.run_round(running, 1, submit=[1, 2])
    result = market.finalize(sender=accounts.outsider, task_id=running.task_id)
    paid = credits_by_account(result.events)
    revoked = running.trainers[0].address
    assert paid[(revoked, CreditReason.TRAINER_PAY)] == running.prices_wei[0] // 2
    # It could not submit in round 1 once revoked: its stake went to the buyer.
    assert (revoked, CreditReason.STAKE_RETURNED) not in paid


def test_withdraw_with_nothing_owed(market: FlexMarket, accounts: Accounts):
    with pytest.raises(NothingToWithdrawError) as exc:
        market.withdraw(sender=accounts.outsider)
    assert exc.value.account == accounts.outsider.address
    assert exc.value.code == "nothing_to_withdraw"


# ---- a malicious receiver


def attacker_with_credit(market, accounts, clock, w3, budget: int) -> str:
    """A ReentrantReceiver that created and cancelled a task: ``budget`` is owed to it."""
    attacker = deploy_artifact(
        w3=w3, sender=accounts.outsider, name="ReentrantReceiver", args=[market.address]
    ).address
    created = transact_artifact(
        w3=w3,
        sender=accounts.outsider,
        name="ReentrantReceiver",
        address=attacker,
        function="createTask",
        args=[SPEC_HASH, 1, 1, 1, clock.now() + 100, ROUND_TIMEOUT],
        value_wei=budget,
        market=market.address,
    )
    task_id = created.first(TaskCreated).task_id
    transact_artifact(
        w3=w3,
        sender=accounts.outsider,
        name="ReentrantReceiver",
        address=attacker,
        function="cancelTask",
        args=[task_id],
    )
    assert market.credit_of(account=attacker) == budget
    return attacker


def attack(w3, accounts, market, attacker: str, mode: int):
    return transact_artifact(
        w3=w3,
        sender=accounts.outsider,
        name="ReentrantReceiver",
        address=attacker,
        function="attack",
        args=[mode],
        market=market.address,
    )


CATCH, BUBBLE, REJECT = 0, 1, 2


def test_reentrant_withdraw_is_refused_and_paid_once(
    market: FlexMarket, accounts: Accounts, clock: Clock, w3: Web3
):
    budget = 10**16
    attacker = attacker_with_credit(market, accounts, clock, w3, budget)
    result = attack(w3, accounts, market, attacker, CATCH)
    assert [e.amount_wei for e in result.all(Withdrawn)] == [budget]
    reentries, received, last_error = call_artifact(
        w3=w3, name="ReentrantReceiver", address=attacker, function="observed"
    )
    assert (reentries, received) == (1, budget)
    assert isinstance(decode_revert(last_error), ReentrantCallError)
    assert w3.eth.get_balance(attacker) == budget
    assert market.credit_of(account=attacker) == 0
    assert market.balance_wei() == 0


def test_reentrancy_that_bubbles_fails_the_withdrawal_and_keeps_the_credit(
    market: FlexMarket, accounts: Accounts, clock: Clock, w3: Web3
):
    budget = 10**16
    attacker = attacker_with_credit(market, accounts, clock, w3, budget)
    with pytest.raises(TransferFailedError) as exc:
        attack(w3, accounts, market, attacker, BUBBLE)
    assert (exc.value.account, exc.value.amount_wei) == (attacker, budget)
    assert market.credit_of(account=attacker) == budget
    assert market.balance_wei() == budget
    assert_conserved(market)


def test_receiver_that_rejects_ether_keeps_its_credit(
    market: FlexMarket, accounts: Accounts, clock: Clock, w3: Web3
):
    budget = 10**16
    attacker = attacker_with_credit(market, accounts, clock, w3, budget)
    with pytest.raises(TransferFailedError):
        attack(w3, accounts, market, attacker, REJECT)
    assert market.credit_of(account=attacker) == budget
    assert_conserved(market)


def test_scores_across_several_words_pay_exact_shares(
    market: FlexMarket, accounts: Accounts, flow: Flow, w3: Web3
):
    """17 scored trainers fill the first score word (15 after the marker) and spill over."""
    extra = [Account.from_key(keccak(text=f"extra-trainer-{i}")) for i in range(5)]
    for device in extra:
        w3.provider.make_request("anvil_setBalance", [device.address, hex(10**20)])
        market.register_device(
            sender=accounts.owner,
            device=device.address,
            device_class=DeviceClass.CPU,
            can_aggregate=False,
        )
    trainers = [*accounts.trainers, *extra]
    prices = [GWEI + 1_000_003 * i for i in range(len(trainers))]
    task_id = flow.create_task(rounds=1, max_trainers=len(trainers), budget_wei=10**18)
    flow.bid_aggregator(task_id, accounts.aggregators[0], MIN_AGGREGATOR_PRICE_WEI)
    for trainer, price in zip(trainers, prices, strict=True):
        flow.bid_trainer(task_id, trainer, price)
    flow.close_bidding(task_id)
    market.select_nodes(sender=accounts.outsider, task_id=task_id)
    selection = market.selection(task_id=task_id)
    assert selection is not None
    by_address = {t.address: t for t in trainers}
    positioned = [by_address[a] for a in selection.trainers]
    market.publish_global_model(
        sender=accounts.aggregators[0], task_id=task_id, round_number=0, model_id=model_id(0)
    )
    for p, trainer in enumerate(positioned):
        market.submit_update(
            sender=trainer, task_id=task_id, round_number=0, model_id=model_id(f"u{p}")
        )
    scores = [(7919 * (p + 1)) % 65536 for p in range(len(positioned))]
    market.publish_global_model(
        sender=accounts.aggregators[0],
        task_id=task_id,
        round_number=1,
        model_id=model_id(1),
        aggregated_mask=mask_of(range(len(positioned))),
        scores=scores,
    )
    assert market.round_info(task_id=task_id, round_number=0).scores == tuple(scores)
    result = market.finalize(sender=accounts.outsider, task_id=task_id)
    pay = round_pay(selection.trainer_prices_wei, mask_of(range(len(positioned))), scores)
    paid = credits_by_account(result.events)
    for p, trainer in enumerate(positioned):
        assert paid.get((trainer.address, CreditReason.TRAINER_PAY), 0) == pay[p]
        assert pay[p] <= selection.trainer_prices_wei[p]
    assert_conserved(market)
