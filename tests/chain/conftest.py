"""Chain fixtures: one FlexMarket per session, every test inside an evm snapshot."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from web3 import Web3

from chain.client import FlexMarket
from chain.events import DeviceClass, Role, TaskCreated
from chain.launcher import dev_accounts
from chain.selection import mask_of

MIN_TRAINER_PRICE_WEI = 1_000_000_000
MIN_AGGREGATOR_PRICE_WEI = 2_000_000_000
ROUND_TIMEOUT = 600
BIDDING_WINDOW = 1_000
SPEC_HASH = keccak(text="flex-test-spec")
N_TRAINERS = 12


def model_id(label: object) -> str:
    """A model ID as the data plane makes them: keccak of (here, made-up) bytes."""
    return "0x" + keccak(text=f"model-{label}").hex()


class Clock:
    """Block time on the local chain: read it, move it, pin the next block's timestamp."""

    def __init__(self, w3: Web3) -> None:
        self.w3 = w3

    def now(self) -> int:
        return self.w3.eth.get_block("latest")["timestamp"]

    def advance(self, seconds: int) -> int:
        """Mines a block ``seconds`` after the latest; returns its timestamp."""
        return self.mine_at(self.now() + seconds)

    def mine_at(self, timestamp: int) -> int:
        self.w3.provider.make_request("evm_mine", [timestamp])
        return self.now()

    def next_block_at(self, timestamp: int) -> None:
        """The next transaction's block (and estimates for it) will carry ``timestamp``."""
        self.w3.provider.make_request("evm_setNextBlockTimestamp", [timestamp])


class Snapshots:
    def __init__(self, w3: Web3) -> None:
        self.w3 = w3

    def take(self) -> str:
        return self.w3.provider.make_request("evm_snapshot", [])["result"]

    def revert(self, snapshot: str) -> None:
        assert self.w3.provider.make_request("evm_revert", [snapshot])["result"] is True


@dataclass
class Running:
    """A selected task with round 0 published: trainers listed by position."""

    task_id: int
    buyer: LocalAccount
    aggregator: LocalAccount
    aggregator_price_wei: int
    trainers: list[LocalAccount]
    prices_wei: list[int]
    budget_wei: int
    rounds: int
    published: list[str] = field(default_factory=list)

    @property
    def everyone(self) -> int:
        return mask_of(range(len(self.trainers)))


class Flow:
    """Builds market state through the client, the way the platform would."""

    def __init__(self, market: FlexMarket, clock: Clock, accounts: Accounts) -> None:
        self.market = market
        self.clock = clock
        self.accounts = accounts

    def create_task(
        self,
        *,
        buyer: LocalAccount | None = None,
        rounds: int = 2,
        min_trainers: int = 1,
        max_trainers: int = 3,
        budget_wei: int | None = None,
        round_timeout: int = ROUND_TIMEOUT,
        bidding_window: int = BIDDING_WINDOW,
        spec_hash: bytes | str = SPEC_HASH,
        **terms: Any,
    ) -> int:
        """A task bidding now; ``terms`` are create_task's dispute window and strategy."""
        if budget_wei is None:
            budget_wei = (
                10 * rounds * (max_trainers * MIN_TRAINER_PRICE_WEI + MIN_AGGREGATOR_PRICE_WEI)
            )
        result = self.market.create_task(
            sender=buyer or self.accounts.buyer,
            spec_hash=spec_hash,
            rounds=rounds,
            min_trainers=min_trainers,
            max_trainers=max_trainers,
            bidding_ends=self.clock.now() + bidding_window,
            round_timeout=round_timeout,
            budget_wei=budget_wei,
            **terms,
        )
        return result.first(TaskCreated).task_id

    def bid_trainer(
        self, task_id: int, trainer: LocalAccount, price_wei: int, samples: int = 100
    ) -> None:
        self.market.place_bid(
            sender=trainer,
            task_id=task_id,
            price_per_round_wei=price_wei,
            samples=samples,
            role=Role.TRAINER,
        )

    def bid_aggregator(self, task_id: int, aggregator: LocalAccount, price_wei: int) -> None:
        self.market.place_bid(
            sender=aggregator,
            task_id=task_id,
            price_per_round_wei=price_wei,
            samples=0,
            role=Role.AGGREGATOR,
        )

    def close_bidding(self, task_id: int) -> None:
        ends = self.market.task(task_id=task_id).bidding_ends
        if self.clock.now() < ends:
            self.clock.mine_at(ends)

    def start(
        self,
        *,
        rounds: int = 2,
        trainer_prices_wei: Sequence[int] = (
            MIN_TRAINER_PRICE_WEI,
            2 * MIN_TRAINER_PRICE_WEI,
            3 * MIN_TRAINER_PRICE_WEI,
        ),
        aggregator_price_wei: int = MIN_AGGREGATOR_PRICE_WEI,
        budget_wei: int | None = None,
        round_timeout: int = ROUND_TIMEOUT,
        publish_round_zero: bool = True,
        samples: Sequence[int] | None = None,
        **terms: Any,
    ) -> Running:
        """A task whose trainers all get selected (by default equal samples: cheapest
        first); ``terms`` as in create_task."""
        n = len(trainer_prices_wei)
        if budget_wei is None:
            budget_wei = rounds * (sum(trainer_prices_wei) + aggregator_price_wei) + 12_345
        task_id = self.create_task(
            rounds=rounds,
            min_trainers=1,
            max_trainers=n,
            budget_wei=budget_wei,
            round_timeout=round_timeout,
            **terms,
        )
        aggregator = self.accounts.aggregators[0]
        self.bid_aggregator(task_id, aggregator, aggregator_price_wei)
        counts = [100] * n if samples is None else samples
        for trainer, price, count in zip(
            self.accounts.trainers, trainer_prices_wei, counts, strict=False
        ):
            self.bid_trainer(task_id, trainer, price, count)
        self.close_bidding(task_id)
        self.market.select_nodes(sender=self.accounts.outsider, task_id=task_id)
        selection = self.market.selection(task_id=task_id)
        assert selection is not None
        by_address = {t.address: t for t in self.accounts.trainers}
        running = Running(
            task_id=task_id,
            buyer=self.accounts.buyer,
            aggregator=aggregator,
            aggregator_price_wei=aggregator_price_wei,
            trainers=[by_address[a] for a in selection.trainers],
            prices_wei=list(selection.trainer_prices_wei),
            budget_wei=budget_wei,
            rounds=rounds,
        )
        if publish_round_zero:
            self.publish(running, 0)
        return running

    def publish(
        self, running: Running, round_number: int, mask: int = 0, scores: Sequence[int] = ()
    ) -> None:
        model = model_id(f"{running.task_id}-global-{round_number}")
        self.market.publish_global_model(
            sender=running.aggregator,
            task_id=running.task_id,
            round_number=round_number,
            model_id=model,
            aggregated_mask=mask,
            scores=scores,
        )
        running.published.append(model)

    def submit(self, running: Running, round_number: int, positions: Sequence[int]) -> None:
        for p in positions:
            self.market.submit_update(
                sender=running.trainers[p],
                task_id=running.task_id,
                round_number=round_number,
                model_id=model_id(f"{running.task_id}-update-{round_number}-{p}"),
            )

    def close_submissions(self, running: Running) -> None:
        """Moves the chain past the open round's submission window (a round that not every
        trainer submitted in can only be published then)."""
        deadline = self.market.task(task_id=running.task_id).submission_deadline
        if self.clock.now() <= deadline:
            self.clock.mine_at(deadline + 1)

    def run_round(
        self,
        running: Running,
        round_number: int,
        *,
        submit: Sequence[int] | None = None,
        aggregate: Sequence[int] | None = None,
        scores: Sequence[int] = (),
    ) -> None:
        """Trainers submit for ``round_number``, the aggregator publishes round + 1."""
        positions = range(len(running.trainers)) if submit is None else submit
        self.submit(running, round_number, positions)
        if len(set(positions)) < len(running.trainers):
            self.close_submissions(running)
        used = positions if aggregate is None else aggregate
        self.publish(running, round_number + 1, mask_of(used), scores)


@dataclass(frozen=True)
class Accounts:
    owner: LocalAccount
    buyer: LocalAccount
    outsider: LocalAccount
    aggregators: list[LocalAccount]
    trainers: list[LocalAccount]
    unregistered: LocalAccount
    spare: list[LocalAccount]

    def all(self) -> list[LocalAccount]:
        return [
            self.owner,
            self.buyer,
            self.outsider,
            *self.aggregators,
            *self.trainers,
            self.unregistered,
            *self.spare,
        ]


@pytest.fixture(scope="session")
def accounts() -> Accounts:
    devs = dev_accounts(20)
    return Accounts(
        owner=devs[0],
        buyer=devs[1],
        outsider=devs[2],
        aggregators=devs[3:5],
        trainers=devs[5 : 5 + N_TRAINERS],
        unregistered=devs[17],
        spare=devs[18:20],
    )


@pytest.fixture(scope="session")
def market(w3: Web3, accounts: Accounts) -> FlexMarket:
    deployed = FlexMarket.deploy(
        w3=w3,
        sender=accounts.owner,
        min_trainer_price_wei=MIN_TRAINER_PRICE_WEI,
        min_aggregator_price_wei=MIN_AGGREGATOR_PRICE_WEI,
    )
    for aggregator in accounts.aggregators:
        deployed.register_device(
            sender=accounts.owner,
            device=aggregator.address,
            device_class=DeviceClass.GPU,
            can_aggregate=True,
        )
    for i, trainer in enumerate(accounts.trainers):
        deployed.register_device(
            sender=accounts.owner,
            device=trainer.address,
            device_class=DeviceClass(i % 3),
            can_aggregate=False,
        )
    return deployed


@pytest.fixture(scope="session")
def clock(w3: Web3) -> Clock:
    return Clock(w3)


@pytest.fixture(scope="session")
def snapshots(w3: Web3) -> Snapshots:
    return Snapshots(w3)


@pytest.fixture(autouse=True)
def _isolated(market: FlexMarket, snapshots: Snapshots) -> Iterator[None]:
    """Every test starts from the freshly deployed market and leaves no trace."""
    snapshot = snapshots.take()
    yield
    snapshots.revert(snapshot)


@pytest.fixture
def flow(market: FlexMarket, clock: Clock, accounts: Accounts) -> Flow:
    return Flow(market, clock, accounts)


@pytest.fixture
def running(flow: Flow) -> Running:
    """Three trainers at 1, 2 and 3 gwei per round, two rounds, round 0 published."""
    return flow.start()
