"""The doorbell that tells FLEX's processes the chain moved: pushed by the node's websocket,
through a restart of the node, and a slow poll where the node has no websocket."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from celery import Celery

from chain.events import UpdateSubmitted, decode_logs
from chain.follow import Doorbell, ws_url
from chain.launcher import LocalChain, free_port
from core.messages import RoundAggregateRequest
from stack.demo import RoundClock
from tests.chain.test_events import lifecycle
from tests.chain.test_watcher import trainer_node
from training.store import ModelStore
from worker.follow import RoundFollower

# Waits are generous (a busy machine is waited for), never asserted as durations.
WAIT_S = 120


class Rings:
    """Counts the doorbell's calls and lets a test wait for the next ones."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = threading.Condition()

    def __call__(self) -> None:
        with self._changed:
            self.count += 1
            self._changed.notify_all()

    def wait_beyond(self, count: int) -> int:
        deadline = time.monotonic() + WAIT_S
        with self._changed:
            while self.count <= count:
                left = deadline - time.monotonic()
                assert left > 0, f"no ring beyond {count} in {WAIT_S} s"
                self._changed.wait(left)
            return self.count


@pytest.fixture
def node(tmp_path) -> Iterator[LocalChain]:
    chain = LocalChain(state_path=tmp_path / "state.json", state_interval=1).start()
    yield chain
    chain.stop()


def mine(chain: LocalChain) -> None:
    chain.w3().provider.make_request("evm_mine", [])


def settle(rings: Rings) -> int:
    """The count once the doorbell is quiet (its first ring, on connecting, is in)."""
    count = rings.wait_beyond(0)
    time.sleep(0.5)
    return max(count, rings.count)


def rings_after_blocks(node: LocalChain, rings: Rings, blocks: int = 3) -> int:
    """The count a second after mining ``blocks`` blocks in a row."""
    for _ in range(blocks):
        mine(node)
    time.sleep(1.0)
    return rings.count


def test_ws_url_follows_the_rpc_url():
    assert ws_url("http://127.0.0.1:8545") == "ws://127.0.0.1:8545"
    assert ws_url("https://node.example:443/rpc") == "wss://node.example:443/rpc"
    assert ws_url("ws://127.0.0.1:8545") == "ws://127.0.0.1:8545"


def test_a_new_block_rings_without_polling(node):
    rings = Rings()
    # No idle look for the test's whole length: only the node's push can ring.
    bell = Doorbell(url=node.rpc_url, ring=rings, idle_s=3600).start()
    try:
        assert bell.connected.wait(WAIT_S)
        quiet = settle(rings)
        mine(node)
        rings.wait_beyond(quiet)
    finally:
        bell.stop()


def test_the_doorbell_survives_a_restart_of_the_node(node):
    rings = Rings()
    bell = Doorbell(url=node.rpc_url, ring=rings, idle_s=3600).start()
    try:
        assert bell.connected.wait(WAIT_S)
        settle(rings)
        node.stop()
        deadline = time.monotonic() + WAIT_S
        while bell.connected.is_set():
            assert time.monotonic() < deadline, "the doorbell never saw the node go"
            time.sleep(0.05)
        node.start()  # same port, same state
        assert bell.connected.wait(WAIT_S)
        quiet = settle(rings)
        mine(node)
        rings.wait_beyond(quiet)  # pushed by the new subscription
    finally:
        bell.stop()


def test_a_ring_for_a_push_knows_its_block_and_one_after_a_lost_subscription_does_not(node):
    """A look that answers a push reads up to the block it named without asking the node for
    its head; after the node went away nothing pushed before is trusted."""
    rings, heads = Rings(), []

    def ring() -> None:
        heads.append(bell.head)
        rings()

    bell = Doorbell(url=node.rpc_url, ring=ring, idle_s=3600).start()
    try:
        assert bell.connected.wait(WAIT_S)
        quiet = settle(rings)
        assert heads[0] is None  # the look on connecting asks the node
        mine(node)
        quiet = rings.wait_beyond(quiet)
        assert heads[-1] == node.w3().eth.block_number
        node.stop()
        deadline = time.monotonic() + WAIT_S
        while bell.connected.is_set():
            assert time.monotonic() < deadline, "the doorbell never saw the node go"
            time.sleep(0.05)
        lost = len(heads)
        node.start()
        assert bell.connected.wait(WAIT_S)
        settle(rings)
        assert len(heads) > lost
        assert set(heads[lost:]) == {None}
        quiet = rings.count
        mine(node)
        rings.wait_beyond(quiet)
        assert heads[-1] == node.w3().eth.block_number
    finally:
        bell.stop()


def test_a_push_it_cannot_read_or_of_a_dropped_block_leaves_the_head_as_it_was():
    """What the node sends that names no block of the chain as it now stands (an answer
    instead of a push, a log of a block a re-org dropped, malformed JSON, a number that is
    not hex, a lower block than one already pushed) changes nothing: the look asks the node
    or reads up to the head it had."""
    bell = Doorbell(url="http://127.0.0.1:9", ring=lambda: None)
    push = '{"jsonrpc":"2.0","method":"eth_subscription","params":{"result":%s}}'
    for message in (
        '{"jsonrpc":"2.0","id":1,"result":"0x1"}',
        push % '{"blockNumber":"0x9","removed":true}',
        "{not json",
        b"\xff\xfe",
        push % '{"blockNumber":"nine"}',
        push % '"0x9"',
    ):
        bell._note(message)
        assert bell.head is None, message
    bell._note(push % '{"number":"0x7"}')  # a new head
    bell._note(push % '{"blockNumber":"0x5","removed":false}')  # a log of an earlier block
    assert bell.head == 7


def test_a_log_filter_rings_only_for_matching_logs(node):
    rings = Rings()
    # A filter on a contract that does not exist: new blocks carry no log of it.
    nobody = "0x" + "ab" * 20
    bell = Doorbell(url=node.rpc_url, ring=rings, logs={"address": nobody}, idle_s=3600).start()
    try:
        assert bell.connected.wait(WAIT_S)
        quiet = settle(rings)
        assert rings_after_blocks(node, rings) == quiet
    finally:
        bell.stop()


def test_without_a_websocket_it_still_rings_at_a_slow_pace():
    rings = Rings()
    # Nothing listens there: every connection fails, and the doorbell keeps looking.
    bell = Doorbell(url=f"http://127.0.0.1:{free_port()}", ring=rings, idle_s=3600).start()
    try:
        count = rings.wait_beyond(0)
        rings.wait_beyond(count)
        assert not bell.connected.is_set()
    finally:
        bell.stop()


def test_a_failing_look_does_not_stop_the_doorbell(node):
    calls = Rings()

    def ring() -> None:
        calls()
        raise RuntimeError("the caller's look failed")

    bell = Doorbell(url=node.rpc_url, ring=ring, idle_s=3600).start()
    try:
        assert bell.connected.wait(WAIT_S)
        quiet = settle(calls)
        mine(node)
        calls.wait_beyond(quiet)
        assert bell.connected.is_set()
    finally:
        bell.stop()


def test_stopping_wakes_a_doorbell_waiting_on_a_quiet_node(node):
    rings = Rings()
    # Nothing would ring for an hour: stopping must not wait for that.
    bell = Doorbell(url=node.rpc_url, ring=rings, idle_s=3600).start()
    assert bell.connected.wait(WAIT_S)
    settle(rings)
    bell.stop(timeout=WAIT_S)
    assert not bell._thread.is_alive()
    assert not bell.connected.is_set()


def test_a_trainers_process_is_rung_by_published_models_and_an_aggregators_by_updates_too(
    market, accounts, flow, running, w3, tmp_path
):
    """What each follower asks the node to push: a process of trainers only has nothing to do
    with each update a round brings (as many as trainers), so it is not told of them."""
    lifecycle(market, accounts, flow, running)

    def pushed(*, may_aggregate: bool) -> set[str]:
        home = tmp_path / str(may_aggregate)
        node = trainer_node(home, accounts.trainers[0], market, ModelStore(home / "models"))
        node.config = node.config.model_copy(update={"may_aggregate": may_aggregate})
        follower = RoundFollower([node], app=Celery(set_as_current=False))
        logs = w3.eth.get_logs({**follower.bell.logs, "fromBlock": 0, "toBlock": "latest"})
        return {e.name for e in decode_logs(logs, address=market.address)}

    assert pushed(may_aggregate=False) == {"GlobalModelPublished"}
    assert pushed(may_aggregate=True) == {"GlobalModelPublished", "UpdateSubmitted"}


def test_an_aggregator_fetches_a_rounds_updates_side_by_side_and_aggregates_after_all(
    market, accounts, flow, running, w3, chain_node, tmp_path
):
    """Each update is fetched as its submission is mined, beside those still being fetched
    (one slow trainer's data plane holds up no other), and the aggregation is handed on
    once every fetch is done: it finds them all in the store."""
    flow.run_round(running, 0)
    node = trainer_node(tmp_path, running.aggregator, market, ModelStore(tmp_path / "models"))
    node.config = node.config.model_copy(
        update={"may_aggregate": True, "eth_rpc_url": chain_node.rpc_url}
    )
    follower = RoundFollower([node], app=Celery(set_as_current=False))
    logs = w3.eth.get_logs({**follower.bell.logs, "fromBlock": 0, "toBlock": "latest"})
    submitted = [
        e
        for e in decode_logs(logs, address=market.address)
        if isinstance(e, UpdateSubmitted) and e.task_id == running.task_id
    ]
    assert len(submitted) == len(running.trainers) > 1
    order = RoundAggregateRequest(
        chain_id=w3.eth.chain_id,
        contract=market.address,
        node=node.address,
        task_id=running.task_id,
        spec={"rounds": running.rounds},
        round_number=0,
        trainer_urls={},
        trainer_certs_sha256={},
    )
    follower.received(name="worker.aggregate", message=order.dump())
    started, fetched, sent = [], [], []
    release = threading.Event()

    def fetch(order: RoundAggregateRequest, event: UpdateSubmitted) -> None:
        started.append(event.trainer)
        release.wait(WAIT_S)  # no fetch ends before every one has started
        fetched.append(event.trainer)

    follower._prefetch = fetch  # type: ignore[method-assign]
    follower._send = lambda name, work: sent.append((name, work.round_number, sorted(fetched)))  # type: ignore[method-assign]
    try:
        for event in submitted:
            follower._update(event)
        deadline = time.monotonic() + WAIT_S
        while len(started) < len(submitted) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(started) == sorted(e.trainer for e in submitted)
        assert sent == []  # every update in, none fetched yet: not handed on
        release.set()
        while not sent and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sent == [("worker.aggregate", 0, sorted(e.trainer for e in submitted))]
    finally:
        release.set()
        follower.stop()


def test_a_followers_look_for_a_push_asks_the_node_for_the_logs_alone(
    market, flow, running, chain_node, tmp_path
):
    """A round's every update and model rings each device process: the look that answers
    reads the logs up to the block the push named, without a request for the head first."""
    node = trainer_node(tmp_path, running.trainers[0], market, ModelStore(tmp_path / "models"))
    node.config = node.config.model_copy(update={"eth_rpc_url": chain_node.rpc_url})
    follower = RoundFollower([node], app=Celery(set_as_current=False))
    asked, published = [], []
    sent = follower._w3.provider.make_request

    def make_request(method, params):
        asked.append(method)
        return sent(method, params)

    follower._w3.provider.make_request = make_request  # type: ignore[method-assign]
    follower._published = lambda event: published.append(event.round)  # type: ignore[method-assign]
    follower.start()
    try:
        deadline = time.monotonic() + WAIT_S
        # The look on starting and the one on connecting ask for the head: nothing was pushed.
        while asked.count("eth_blockNumber") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert asked == ["eth_blockNumber", "eth_blockNumber"]
        asked.clear()
        flow.run_round(running, 0)
        while not published and time.monotonic() < deadline:
            time.sleep(0.05)
        assert published == [1]
        assert asked == ["eth_getLogs"]
    finally:
        follower.stop()


def test_blocks_within_the_spacing_are_rung_for_once_when_it_is_over(node):
    rings = Rings()
    # A sync for every block of a busy moment would be a sync per update of a round: the
    # platform's doorbell answers the blocks that come within its spacing with one ring.
    bell = Doorbell(url=node.rpc_url, ring=rings, idle_s=3600, spacing_s=15).start()
    try:
        assert bell.connected.wait(WAIT_S)
        quiet = settle(rings)
        # Held back: the connection's ring was just now.
        assert rings_after_blocks(node, rings) == quiet
        assert rings.wait_beyond(quiet) == quiet + 1
        time.sleep(1.0)
        assert rings.count == quiet + 1  # the three blocks, in one look
    finally:
        bell.stop(timeout=WAIT_S)
    assert not bell._thread.is_alive()


def test_the_bench_times_each_round_of_its_task_by_the_pushes_of_its_logs(
    market, flow, w3, chain_node
):
    """`python -m bench` times a round from when the node pushes its model's log, not from
    when the platform's mirror shows it (no platform runs here), and the round's updates
    from theirs: each of the task's models and updates once, none timed before it was
    sent, and none of another task's."""
    other = flow.start(rounds=3)
    from_block = w3.eth.block_number
    for number in (0, 1, 2):  # mined first, up to a round the task has not
        flow.run_round(other, number)
    seen: list[int] = []
    clock = RoundClock(
        rpc_url=chain_node.rpc_url,
        address=market.address,
        task_id=(running := flow.start(rounds=2)).task_id,
        from_block=from_block,
        on_round=seen.append,
    )
    sent = {}
    with clock:
        for number in (0, 1):
            sent[number] = time.monotonic()
            flow.run_round(running, number)  # the updates of round number, model number + 1
        deadline = time.monotonic() + WAIT_S
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert seen == [1, 2]  # the initial model, round 0, is no round
    assert sorted(clock.published) == [0, 1, 2]
    assert sorted(clock.submitted) == [0, 1]
    for number in (0, 1):
        updates = clock.submitted[number]
        assert len(updates) == len(running.trainers)
        assert min(updates) >= sent[number]
        assert clock.published[number + 1] >= max(updates)
        phases = clock.phases(number)
        assert 0 <= phases["first_update_s"] <= phases["last_update_s"]
    assert clock.phases(2) is None  # the final model trains nothing
