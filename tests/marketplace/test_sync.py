"""Chain sync against the real Anvil, Redis and database: idempotent, resumable, re-org safe,
and unhurt by a node that goes away mid-run."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from amqp.exceptions import NotFound
from celery import Celery
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from kombu import Connection
from web3 import Web3
from web3.middleware import Web3Middleware

from chain.client import FlexMarket
from chain.errors import ChainUnavailableError
from chain.events import DeviceClass, Role, TaskCreated
from chain.launcher import LocalChain, dev_accounts
from chain.records import TxResult
from marketplace import lifecycle, services
from marketplace.models import (
    Bid,
    ChainCursor,
    ChainEventRecord,
    Payout,
    PayoutReason,
    Task,
    TaskState,
)
from marketplace.selectors import task_view_get
from marketplace.sync import ChainSync
from marketplace.tasks import chain_sync
from tests.conftest import broker_vhost_new
from training import validation
from training.spec import TaskSpec

pytestmark = pytest.mark.django_db(transaction=True)

# With the bundled held-out split as its validation set, as the website fills it in.
SPEC = TaskSpec.from_dict(
    {
        "model": "digits-mlp",
        "dataset": "digits-8x8",
        "rounds": 1,
        "seed": 3,
        "validation": validation.validation_id(validation.bundled(schema="digits-8x8")),
    }
)
PRICE = 2 * 10**14


# ---------------------------------------------------------------- shared by the mirror's tests


@dataclass
class Broker:
    """The vhost the platform's Celery messages go to in a test; reads them back."""

    url: str

    def messages(self, queue: str) -> list[tuple[str, dict]]:
        """(task name, message) of every message waiting in ``queue``, oldest first; they
        stay in the queue (taken unacknowledged, then handed back)."""
        return [(name, message) for name, message, _ in self.waiting(queue)]

    def waiting(self, queue: str) -> list[tuple[str, dict, str | None]]:
        """``messages`` with the time each is to run at (Celery's ETA; None: at once)."""
        found = []
        with Connection(self.url) as conn:
            channel = conn.channel()
            try:
                while (raw := channel.basic_get(queue, no_ack=False)) is not None:
                    _, kwargs, _ = json.loads(raw.body)
                    found.append((raw.headers["task"], kwargs["message"], raw.headers.get("eta")))
            except NotFound:  # nothing was ever sent there
                return []
            channel.close()
        return found


@pytest.fixture
def mirror_env(settings, monkeypatch) -> Iterator[Broker]:
    """Keeps what sync sends apart from any platform running on the same servers: Celery
    messages go to a vhost of their own, Channels groups get a prefix of their own."""
    vhost = broker_vhost_new("mirror")
    app = Celery("flex-test", broker=vhost.url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])
    monkeypatch.setattr(lifecycle, "celery_app", app)
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [settings.REDIS_URL], "prefix": f"flex-test-{uuid.uuid4().hex}"},
        }
    }
    yield Broker(vhost.url)
    app.close()
    vhost.admin.vhost_delete(vhost.name)


def new_device(w3: Web3, label: str) -> LocalAccount:
    """A fresh device key with gas money (the session chain outlives every test)."""
    account = Account.from_key(keccak(text=f"flex-sync-{label}-{uuid.uuid4().hex}"))
    w3.provider.make_request("anvil_setBalance", [account.address, hex(10**20)])
    return account


def register(market: FlexMarket, device: LocalAccount, *, aggregate: bool = False) -> TxResult:
    return market.register_device(
        sender=dev_accounts(1)[0],
        device=device.address,
        device_class=DeviceClass.CPU,
        can_aggregate=aggregate,
    )


def chain_now(w3: Web3) -> int:
    return w3.eth.get_block("pending")["timestamp"]


def create_task(
    market: FlexMarket,
    buyer: LocalAccount,
    *,
    spec_hash: bytes = SPEC.hash,
    budget_wei: int = 10**16,
    window_s: int = 3600,
) -> int:
    created = market.create_task(
        sender=buyer,
        spec_hash=spec_hash,
        rounds=1,
        min_trainers=1,
        max_trainers=2,
        bidding_ends=chain_now(market.w3) + window_s,
        round_timeout=600,
        budget_wei=budget_wei,
    )
    return created.first(TaskCreated).task_id


def mirror_rows(chain_task_id: int) -> dict:
    """Everything the mirror holds about one task, comparable across runs."""
    task = Task.objects.get(chain_task_id=chain_task_id)
    return {
        "task": Task.objects.filter(pk=task.pk).values().get(),
        "bids": list(Bid.objects.filter(task=task).order_by("bid_index").values()),
        "events": list(
            ChainEventRecord.objects.filter(task_id=chain_task_id)
            .order_by("block_number", "log_index")
            .values("pk", "name", "tx_hash", "log_index", "block_hash", "args")
        ),
    }


# ---------------------------------------------------------------- tests


@pytest.fixture
def buyer() -> LocalAccount:
    return dev_accounts(1, start=9)[0]


def test_running_sync_twice_gives_the_same_rows(platform_market, mirror_env, buyer):
    market, w3 = platform_market, platform_market.w3
    trainer, aggregator = new_device(w3, "trainer"), new_device(w3, "aggregator")
    register(market, trainer)
    register(market, aggregator, aggregate=True)
    task_id = create_task(market, buyer)
    market.place_bid(
        sender=trainer, task_id=task_id, price_per_round_wei=PRICE, samples=50, role=Role.TRAINER
    )
    market.place_bid(
        sender=aggregator,
        task_id=task_id,
        price_per_round_wei=PRICE,
        samples=1,
        role=Role.AGGREGATOR,
    )
    # A replaced bid keeps its index and takes the new price.
    market.place_bid(
        sender=trainer,
        task_id=task_id,
        price_per_round_wei=PRICE + 1,
        samples=60,
        role=Role.TRAINER,
    )

    first = ChainSync().run()
    rows = mirror_rows(task_id)
    second = ChainSync().run()
    third = chain_sync()

    assert first.status == "synced"
    assert first.events >= 6
    assert second.events == 0
    assert third["events"] == 0
    assert mirror_rows(task_id) == rows
    task = Task.objects.get(chain_task_id=task_id)
    assert task.state == TaskState.BIDDING
    assert task.order is None  # created outside the website: no order, so no title or spec
    assert task.buyer is None  # nor a website account: the buyer's address is no wallet of it
    assert task.spec_hash == SPEC.hash_hex
    assert task.budget_wei == 10**16
    assert task.buyer_address == buyer.address
    bids = {b.device: b for b in task.bids.all()}
    assert bids[trainer.address].price_per_round_wei == PRICE + 1
    assert bids[trainer.address].samples == 60
    assert bids[trainer.address].bid_index == 0
    assert bids[aggregator.address].role == Role.AGGREGATOR.name.lower()
    assert [e["name"] for e in rows["events"]] == [
        "TaskCreated",
        "DisputeTermsSet",
        *["BidPlaced"] * 3,
    ]
    assert rows["events"][0]["args"]["budget_wei"] == str(10**16)
    cursor = ChainCursor.objects.get(contract_address=market.address)
    assert cursor.block_number == w3.eth.block_number
    assert cursor.block_hash == w3.eth.get_block(cursor.block_number)["hash"].to_0x_hex()
    assert cursor.last_lag_ms is not None


def test_withdrawn_and_capped_bids_and_deposits_are_mirrored(platform_market, mirror_env, buyer):
    market, w3 = platform_market, platform_market.w3
    first, second, third = (new_device(w3, f"bidder-{i}") for i in range(3))
    for device in (first, second, third):
        register(market, device)
    task_id = create_task(market, buyer)
    stake = market.task(task_id=task_id).trainer_stake_wei
    for device in (first, second, third):
        market.place_bid(
            sender=device,
            task_id=task_id,
            price_per_round_wei=PRICE,
            samples=2**64 - 1,
            role=Role.TRAINER,
        )
    ChainSync().run()  # the withdrawal below is in a later chunk than the bids
    market.withdraw_bid(sender=first, task_id=task_id)
    ChainSync().run()

    task = Task.objects.get(chain_task_id=task_id)
    assert task.sample_cap == 1000
    bids = {b.device: b for b in task.bids.all()}
    assert set(bids) == {second.address, third.address}
    # The last bid moved into the withdrawn one's index, as on chain.
    assert bids[third.address].bid_index == 0
    assert bids[second.address].bid_index == 1
    assert {b.samples for b in bids.values()} == {1000}
    assert {b.deposit_wei for b in bids.values()} == {stake}
    refund = Payout.objects.get(task=task, account=first.address)
    assert (refund.amount_wei, refund.reason) == (stake, PayoutReason.STAKE_RETURNED)


class _LogsWithoutBlockTimes(Web3Middleware):
    """A node that leaves blockTimestamp out of its logs, as the JSON-RPC spec allows."""

    def response_processor(self, method, response):
        if method == "eth_getLogs" and isinstance(response.get("result"), list):
            logs = [
                {k: v for k, v in log.items() if k != "blockTimestamp"}
                for log in response["result"]
            ]
            return {**response, "result": logs}
        return response


def test_a_node_whose_logs_carry_no_block_time_is_mirrored_by_block_times(
    platform_market, mirror_env, buyer
):
    market = platform_market
    task_id = create_task(market, buyer)
    w3 = Web3(market.w3.provider)
    w3.middleware_onion.add(_LogsWithoutBlockTimes)
    sync = ChainSync(market=FlexMarket(w3=w3, address=market.address))
    assert sync.run().events >= 2
    cursor = ChainCursor.objects.get(contract_address=market.address)
    assert cursor.last_lag_ms is not None  # dated by the block itself: the logs say nothing
    assert Task.objects.get(chain_task_id=task_id).state == TaskState.BIDDING


def test_a_new_sync_continues_from_the_cursor(platform_market, mirror_env, buyer):
    market = platform_market
    first_task = create_task(market, buyer)
    assert ChainSync().run().events >= 1
    before = mirror_rows(first_task)
    cursor = ChainCursor.objects.get(contract_address=market.address)

    second_task = create_task(market, buyer)
    market.cancel_task(sender=buyer, task_id=second_task)
    restarted = ChainSync().run()  # a new object, as after a restart of the process

    # TaskCreated, DisputeTermsSet, TaskCancelled, PaymentCredited (the refund)
    assert restarted.events == 4
    assert restarted.from_block == cursor.block_number + 1
    assert mirror_rows(first_task) == before
    cancelled = Task.objects.get(chain_task_id=second_task)
    assert cancelled.state == TaskState.CANCELLED
    assert [(p.reason, p.amount_wei) for p in cancelled.payouts.all()] == [("refund", 10**16)]


def test_a_reorg_replaces_the_orphaned_rows(platform_market, mirror_env, buyer):
    market, w3 = platform_market, platform_market.w3
    trainer = new_device(w3, "reorg")
    register(market, trainer)
    snapshot = w3.provider.make_request("evm_snapshot", [])["result"]
    orphan_hash = keccak(text="the orphaned branch's spec")
    task_id = create_task(market, buyer, spec_hash=orphan_hash, budget_wei=10**16)
    market.place_bid(
        sender=trainer, task_id=task_id, price_per_round_wei=PRICE, samples=10, role=Role.TRAINER
    )
    ChainSync().run()
    orphaned_txs = set(
        ChainEventRecord.objects.filter(task_id=task_id).values_list("tx_hash", flat=True)
    )
    assert Bid.objects.filter(task__chain_task_id=task_id).count() == 1

    # The branch loses: the same task id goes to another task, with no bid, a block later.
    assert w3.provider.make_request("evm_revert", [snapshot])["result"] is True
    w3.provider.make_request("evm_mine", [])
    winner = create_task(market, buyer, spec_hash=SPEC.hash, budget_wei=2 * 10**16)
    result = ChainSync().run()

    assert winner == task_id
    assert result.rewinds == 1
    task = Task.objects.get(chain_task_id=task_id)
    assert task.spec_hash == SPEC.hash_hex
    assert task.budget_wei == 2 * 10**16
    assert task.bids.count() == 0
    assert not ChainEventRecord.objects.filter(tx_hash__in=orphaned_txs).exists()
    assert [e.name for e in ChainEventRecord.objects.filter(task_id=task_id)] == [
        "TaskCreated",
        "DisputeTermsSet",
    ]
    cursor = ChainCursor.objects.get(contract_address=market.address)
    assert cursor.block_hash == w3.eth.get_block(cursor.block_number)["hash"].to_0x_hex()
    assert ChainSync().run().rewinds == 0


def test_a_task_whose_creation_a_reorg_orphans_leaves_the_buyers_order(platform_market, mirror_env):
    """Sync drops the mirrored task of an orphaned creation; the buyer's order, the website's
    own row, stays and shows as pending until its transaction is mined again."""
    w3 = platform_market.w3
    user = services.user_signup(username=f"reorged-{uuid.uuid4().hex[:6]}", password="x" * 12)
    services.wallet_fund(wallet=user.wallet)
    snapshot = w3.provider.make_request("evm_snapshot", [])["result"]
    order = services.task_create(
        buyer=user,
        title="orphaned",
        spec=SPEC,
        min_trainers=1,
        max_trainers=1,
        round_timeout_s=600,
        dispute_window_s=0,
        budget_wei=10**16,
        bidding_window_s=600,
    )
    ChainSync().run()
    assert task_view_get(user=user, task_id=order.chain_task_id).state == "bidding"

    assert w3.provider.make_request("evm_revert", [snapshot])["result"] is True
    w3.provider.make_request("evm_mine", [])
    result = ChainSync().run()

    assert result.rewinds == 1
    assert not Task.objects.filter(created_tx=order.created_tx).exists()
    view = task_view_get(user=user, task_id=order.chain_task_id)
    assert (view.state, view.title, view.task) == ("pending", "orphaned", None)


def test_a_record_the_chain_does_not_have_is_dropped(platform_market, mirror_env, buyer):
    """Within the rewind window, records are checked against a fresh scan: one from a lost
    branch (say, stored across a re-org the cursor did not see) goes, its task re-derived."""
    market, w3 = platform_market, platform_market.w3
    task_id = create_task(market, buyer)
    ChainSync().run()
    head = w3.eth.get_block("latest")
    ghost = "0x" + keccak(text=f"ghost-{uuid.uuid4().hex}").hex()
    ChainEventRecord.objects.create(
        name="BidPlaced",
        task_id=task_id,
        tx_hash=ghost,
        log_index=0,
        block_number=head["number"],
        block_hash=head["hash"].to_0x_hex(),
        args={
            "task_id": task_id,
            "device": buyer.address,
            "bid_index": 0,
            "role": "trainer",
            "price_per_round_wei": str(PRICE),
            "samples": 1,
            "replaced": False,
        },
    )
    Bid.objects.create(
        task=Task.objects.get(chain_task_id=task_id),
        device=buyer.address,
        bid_index=0,
        role="trainer",
        price_per_round_wei=PRICE,
        samples=1,
        tx_hash=ghost,
        block_number=head["number"],
    )

    result = ChainSync().run()

    assert result.rewinds == 1
    assert not ChainEventRecord.objects.filter(tx_hash=ghost).exists()
    assert not Bid.objects.filter(task__chain_task_id=task_id).exists()
    assert Task.objects.get(chain_task_id=task_id).state == TaskState.BIDDING


def test_only_one_sync_runs_at_a_time(platform_market, mirror_env, buyer):
    create_task(platform_market, buyer)
    holder = ChainSync()
    with holder.lock() as held:
        assert held
        assert ChainSync().run().status == "busy"
        assert not ChainCursor.objects.exists()
        assert not ChainEventRecord.objects.exists()
    assert ChainSync().run().status == "synced"


class _AskedForAgainMidRun(ChainSync):
    """While its first sync runs, ``meanwhile`` happens: a new block, whose ring asks for a
    sync of its own and finds this one holding the lock."""

    def __init__(self, *, meanwhile, **kwargs) -> None:
        super().__init__(**kwargs)
        self.meanwhile = meanwhile
        self.runs = 0
        self.asked = None

    def _run(self):
        self.runs += 1
        result = super()._run()
        if self.runs == 1:
            self.asked = self.meanwhile()
        return result


def test_a_sync_asked_for_while_one_runs_is_run_after_it(platform_market, mirror_env, buyer):
    first = create_task(platform_market, buyer)
    created = []

    def new_block_rings() -> object:
        created.append(create_task(platform_market, buyer))
        return ChainSync().run()

    sync = _AskedForAgainMidRun(meanwhile=new_block_rings)
    sync.run()

    assert sync.asked.status == "busy"
    # The block that rang during the first run is mirrored by the second, not a tick later.
    assert sync.runs == 2
    assert Task.objects.filter(chain_task_id__in=[first, *created]).count() == 2


class _StopsTheChainAfterOneChunk(ChainSync):
    """Takes the node down right after the first chunk is stored, as a crash would."""

    def __init__(self, *, node: LocalChain, **kwargs) -> None:
        super().__init__(**kwargs)
        self.node = node

    def _store_chunk(self, cursor, chunk):
        stored = super()._store_chunk(cursor, chunk)
        self.node.stop()
        return stored


def test_a_lost_chain_node_leaves_whole_chunks_and_sync_resumes(
    mirror_env, settings, tmp_path: Path
):
    state = tmp_path / "chain" / "state.json"
    node = LocalChain(accounts=2, state_path=state).start()
    try:
        owner = dev_accounts(1)[0]
        market = FlexMarket.deploy(w3=node.w3(), sender=owner)
        settings.ETH_RPC_URL, settings.FLEX_CONTRACT_ADDRESS = node.rpc_url, market.address
        buyer = dev_accounts(1, start=1)[0]
        for _ in range(3):
            create_task(market, buyer, window_s=60)
        # One block per chunk: the first chunk holds the deployment's events only. No HTTP
        # retries: the dead node should fail the run at once.
        fast_w3 = Web3(Web3.HTTPProvider(node.rpc_url, exception_retry_configuration=None))
        crashing = _StopsTheChainAfterOneChunk(
            node=node,
            market=FlexMarket(w3=fast_w3, address=market.address, deploy_block=market.deploy_block),
            chunk_blocks=1,
        )

        with pytest.raises(ChainUnavailableError):
            crashing.run()

        cursor = ChainCursor.objects.get()
        assert cursor.block_number == market.deploy_block
        assert set(ChainEventRecord.objects.values_list("block_number", flat=True)) == {
            market.deploy_block
        }
        assert not Task.objects.exists()
        # The beat job logs it and waits for the next tick.
        assert chain_sync()["status"] == "chain_unavailable"

        node.start()
        resumed = ChainSync(market=FlexMarket(w3=node.w3(), address=market.address)).run()

        assert resumed.status == "synced"
        assert resumed.rewinds == 0
        assert Task.objects.filter(state=TaskState.BIDDING).count() == 3
        keys = list(ChainEventRecord.objects.values_list("tx_hash", "log_index"))
        # The constructor's three, and two for each of three tasks (created, its terms).
        assert len(keys) == len(set(keys)) == 3 + 3 * 2
        # Lag: from the newest event's block time to its row (whole seconds on chain).
        assert 0 <= resumed.lag_ms < 60_000
        assert ChainCursor.objects.get().last_lag_ms == resumed.lag_ms
    finally:
        node.stop()
