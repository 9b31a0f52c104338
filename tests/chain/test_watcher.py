"""A trainer's watch on the real chain and a real data plane: it checks a round chunk by
chunk from the aggregator's openings, finds nothing in an honest round, and in a lying one
builds the challenge the verifier contract upholds; the final round is watched too."""

from __future__ import annotations

import logging
import random

import pytest

from chain.errors import DisputeWindowOpenError, InvalidTaskStateError
from chain.events import AggregateChallenged, TaskState
from chain.fraud import FlexVerifier, Verdict
from dataplane.access import ChainPolicy
from dataplane.audit import Aggregator, check_round, sample_chunks
from dataplane.server import DataPlaneServer
from tests.chain.conftest import MIN_TRAINER_PRICE_WEI, ROUND_TIMEOUT
from tests.chain.test_provenance import LIE_AT, SPEC, run_task
from tests.dataplane.conftest import cert_for
from training.catalogue import initial_weights
from training.fixedpoint import quantize
from training.serialize import Header, Kind, encode, id_hex
from training.store import ModelStore
from worker import trainer as trainer_module
from worker import watcher
from worker.config import BidPolicy, DeviceConfig
from worker.node import Node
from worker.trainer import train
from worker.watcher import watch_round


@pytest.fixture
def watch(flow, accounts, tmp_path):
    """Run a task with the given behaviour, then watch its round as its first trainer."""

    def run(*, send: bool = False, sample: dict | None = None, watchers: int = 1, **behaviour):
        """``send``: the worker's watch, which challenges what it finds wrong; ``sample``:
        check_round's ``limit`` and ``rng``; ``watchers`` > 1: the task's first trainers
        watch in turn, each with its own store, in this process (a host serving several),
        and what each found is returned in a list."""
        market = flow.market
        held = ModelStore(tmp_path / "aggregator")
        task_id = run_task(flow, accounts, held, **behaviour)
        aggregator = accounts.aggregators[0]
        published = held.load(market.global_model(task_id=task_id, round_number=1))
        found = []
        with DataPlaneServer(
            certificate=cert_for("aggregator"),
            store=held,
            policy=ChainPolicy(market=market, ttl=0),
            node_address=aggregator.address,
        ) as plane:
            for n, selected in enumerate(market.selection(task_id=task_id).trainers[:watchers]):
                trainer = next(t for t in accounts.trainers if t.address == selected)
                own = ModelStore(tmp_path / f"trainer-{n}")
                update = market.update_of(task_id=task_id, round_number=0, trainer=selected)
                own.put(held.get(update))
                found.append(
                    (watch_round if send else check_round)(
                        market=market,
                        store=own,
                        account=trainer,
                        spec=SPEC,
                        task_id=task_id,
                        round_number=0,
                        published=published,
                        aggregator=Aggregator(
                            aggregator.address, plane.url, plane.certificate.sha256
                        ),
                        info=market.round_info(task_id=task_id, round_number=0),
                        **(sample or {}),
                    )
                )
        return found if watchers > 1 else found[0]

    return run


def test_an_honest_round_checks_out_on_every_chunk(watch):
    found = watch(lie=False)
    assert found.correct
    assert found.chunks_checked == tuple(range(found.chunks))


def test_a_wrong_value_is_found_and_the_challenge_holds(watch, w3, accounts):
    found = watch(lie=True)
    assert not found.correct
    sent = found.challenge
    assert (sent.chunk, sent.offset) == divmod(LIE_AT, 256)
    finding = FlexVerifier.deploy(w3=w3, sender=accounts.owner).check(sent)
    assert finding.verdict == Verdict.WRONG_VALUE


class Picks(random.Random):
    """Draws the chunks a test names, as if by chance."""

    def __init__(self, *picks: int) -> None:
        super().__init__(0)
        self.picks = list(picks)

    def sample(self, population, k, **_):
        return self.picks[:k]


def test_a_wrong_value_among_sampled_chunks_is_placed_in_its_own_chunk(watch, w3, accounts):
    # The sampled chunks are checked together; the challenge must still name the chunk and
    # the value in it, past the chunks sampled before it (and the model's short last chunk).
    last = watch(lie=False).chunks - 1
    honest = watch(lie=False, sample={"limit": 2, "rng": Picks(last, 0)})
    assert honest.correct
    assert honest.chunks_checked == (0, last)
    lied, offset = divmod(LIE_AT, 256)
    found = watch(lie=True, sample={"limit": 3, "rng": Picks(last, lied, 0)})
    assert found.chunks_checked == (0, lied)
    assert (found.challenge.chunk, found.challenge.offset) == (lied, offset)
    finding = FlexVerifier.deploy(w3=w3, sender=accounts.owner).check(found.challenge)
    assert finding.verdict == Verdict.WRONG_VALUE


def test_an_included_update_of_another_round_is_found(watch, w3, accounts):
    found = watch(lie=False, stale=True)
    assert found.challenge is not None
    finding = FlexVerifier.deploy(w3=w3, sender=accounts.owner).check(found.challenge)
    assert (finding.verdict, finding.which) == (Verdict.INVALID_UPDATE, 2)


def test_large_models_are_sampled_where_the_aggregator_cannot_guess():
    assert sample_chunks(5, limit=64, rng=random.Random(1)) == [0, 1, 2, 3, 4]
    picks = {tuple(sample_chunks(40_000, limit=64, rng=random.Random(s))) for s in range(5)}
    assert len(picks) == 5
    assert all(len(p) == 64 == len(set(p)) and max(p) < 40_000 for p in picks)


def test_the_workers_watch_challenges_a_wrong_round_itself(watch, flow, caplog):
    market = flow.market
    found = watch(lie=True, send=True, dispute_window=600)
    assert not found.correct
    task_id = found.task_id
    assert market.task(task_id=task_id).state == TaskState.ABORTED
    [event] = [
        e
        for chunk in market.scan(to_block=market.w3.eth.block_number)
        for e in chunk.events
        if isinstance(e, AggregateChallenged) and e.task_id == task_id
    ]
    assert (event.round, event.verdict) == (1, Verdict.WRONG_VALUE)
    assert event.challenger == market.selection(task_id=task_id).trainers[0]
    assert "aggregator slashed" in caplog.text


def test_the_workers_watch_lets_an_honest_round_stand(watch, flow):
    found = watch(lie=False, send=True, dispute_window=600)
    assert found.correct
    assert flow.market.task(task_id=found.task_id).state == TaskState.TRAINED


@pytest.mark.parametrize("lie", [True, False], ids=["lying", "honest"])
def test_trainers_on_one_host_check_a_round_once(watch, flow, caplog, monkeypatch, lie):
    """A host serving several trainers of a task fetches and checks each round once for all
    of them: the second finds what the first found without asking the aggregator for a
    chunk, and a wrong round is challenged once, by the first (the second's is refused)."""
    # A host that has checked nothing yet (this process's earlier tests ran the same rounds
    # on a rewound chain).
    monkeypatch.setattr(watcher, "_checked", {})
    caplog.set_level(logging.INFO)
    first, second = watch(lie=lie, send=True, dispute_window=600, watchers=2)
    assert second == first
    assert first.correct is not lie
    served = [r for r in caplog.records if r.name == "dataplane.server" and "served" in r.msg]
    assert len(served) == 1  # the first trainer's one request for the round's chunks
    assert "already checked on this host" in caplog.text
    market = flow.market
    challenges = [
        e
        for chunk in market.scan(to_block=market.w3.eth.block_number)
        for e in chunk.events
        if isinstance(e, AggregateChallenged) and e.task_id == first.task_id
    ]
    assert len(challenges) == int(lie)
    if lie:
        assert challenges[0].challenger == market.selection(task_id=first.task_id).trainers[0]
        assert "challenge of round 1 refused" in caplog.text


def test_a_challenge_too_late_is_logged_not_raised(watch, flow, caplog):
    """A task without a window: the wrong round is found, the contract refuses the
    challenge, and the worker says so and goes on."""
    found = watch(lie=True, send=True)
    assert not found.correct
    assert flow.market.task(task_id=found.task_id).state == TaskState.TRAINED
    assert "dispute_window_closed" in caplog.text


@pytest.mark.parametrize("lie", [True, False], ids=["lying", "honest"])
def test_the_final_model_is_watched_before_the_task_can_settle(
    flow, accounts, tmp_path, caplog, lie
):
    """The final round has nothing to train, yet its trainers' workers get it (worker.train
    of round R) and check it within its window: a lie is challenged before finalize could
    settle the task; an honest model stands and settles once the window closes."""
    market = flow.market
    held = ModelStore(tmp_path / "aggregator")
    task_id = run_task(flow, accounts, held, lie=lie, dispute_window=600)
    assert market.task(task_id=task_id).state == TaskState.TRAINED
    first = market.selection(task_id=task_id).trainers[0]
    trainer = next(t for t in accounts.trainers if t.address == first)
    own = ModelStore(tmp_path / "trainer")
    own.put(held.get(market.update_of(task_id=task_id, round_number=0, trainer=first)))
    node = trainer_node(tmp_path / "node", trainer, market, own)
    aggregator = accounts.aggregators[0]
    with DataPlaneServer(
        certificate=cert_for("aggregator"),
        store=held,
        policy=ChainPolicy(market=market, ttl=0),
        node_address=aggregator.address,
    ) as plane:
        done = train(
            node,
            task_id=task_id,
            round_number=1,
            spec=SPEC.as_dict(),
            aggregator_url=plane.url,
            aggregator_cert=plane.certificate.sha256,
        )
    if lie:
        assert done["challenged"] == market.global_model(task_id=task_id, round_number=1)
        assert market.task(task_id=task_id).state == TaskState.ABORTED
        with pytest.raises(InvalidTaskStateError):
            market.finalize(sender=accounts.outsider, task_id=task_id)
    else:
        assert done is None
        assert "checked on" in caplog.text
        with pytest.raises(DisputeWindowOpenError):
            market.finalize(sender=accounts.outsider, task_id=task_id)
        flow.clock.advance(ROUND_TIMEOUT + 1)
        market.finalize(sender=accounts.outsider, task_id=task_id)
        assert market.task(task_id=task_id).state == TaskState.FINALIZED


def test_an_update_ready_after_its_round_closed_is_logged_not_raised(flow, tmp_path, caplog):
    """A trainer's update that is ready only once the round's submission window has closed
    (a message left from before a restart, a very slow device) is refused by the contract:
    the worker says so in one line and goes on; nothing lands on chain, nothing is retried."""
    market = flow.market
    running = flow.start(rounds=1, trainer_prices_wei=(MIN_TRAINER_PRICE_WEI,), spec_hash=SPEC.hash)
    task_id, trainer = running.task_id, running.trainers[0]
    # Trained before the restart; the round's window closes before it is sent.
    own = ModelStore(tmp_path / "trainer")
    stored_update(own, market, task_id=task_id, trainer=trainer.address)
    flow.clock.advance(ROUND_TIMEOUT + 1)
    node = trainer_node(tmp_path / "node", trainer, market, own)

    with caplog.at_level(logging.INFO, logger="worker.trainer"):
        done = train(
            node,
            task_id=task_id,
            round_number=0,
            spec=SPEC.as_dict(),
            aggregator_url="https://127.0.0.1:9",
            aggregator_cert="00" * 32,
        )

    assert done is None
    assert "the round closed first (submission_closed)" in caplog.text
    assert market.update_of(task_id=task_id, round_number=0, trainer=trainer.address) is None


def test_work_delivered_twice_and_run_side_by_side_lands_once(flow, tmp_path, caplog):
    """Two deliveries of one round's work running at once (a worker of several processes)
    both find the update unsubmitted; the one whose transaction lands second is refused by
    the contract, and the worker takes that as done: one line, no error, one update."""
    market = flow.market
    running = flow.start(rounds=1, trainer_prices_wei=(MIN_TRAINER_PRICE_WEI,), spec_hash=SPEC.hash)
    task_id, trainer = running.task_id, running.trainers[0]
    own = ModelStore(tmp_path / "trainer")
    update_id = stored_update(own, market, task_id=task_id, trainer=trainer.address)
    node = trainer_node(tmp_path / "node", trainer, market, own)
    first = trainer_module._submit(node, task_id=task_id, round_number=0, update_id=update_id)

    with caplog.at_level(logging.INFO, logger="worker.trainer"):
        second = trainer_module._submit(node, task_id=task_id, round_number=0, update_id=update_id)

    assert first is not None
    assert first.tx_hash
    assert second is None
    assert "update for round 0 already on chain" in caplog.text
    assert market.update_of(task_id=task_id, round_number=0, trainer=trainer.address) == update_id
    assert market.round_info(task_id=task_id, round_number=0).submitted_mask == 1


def stored_update(store: ModelStore, market, *, task_id: int, trainer: str) -> str:
    """A round-0 update of ``trainer`` (the initial weights), put in ``store``; its ID."""
    header = Header(
        kind=Kind.UPDATE,
        chain_id=market.w3.eth.chain_id,
        contract=market.address,
        task_id=task_id,
        round_number=0,
        trainer=trainer,
        shapes=tuple(SPEC.model_entry.weight_shapes()),
    )
    return id_hex(store.put(encode(header, quantize(initial_weights(spec=SPEC)))))


def trainer_node(home, account, market, store) -> Node:
    """A trainer's node on this chain, without a worker process around it."""
    config = DeviceConfig(
        server_url="http://127.0.0.1:9",
        name="pixel",
        device_id=1,
        address=account.address,
        device_class="cpu",
        queues=["device.1"],
        broker_url="redis://127.0.0.1:9/0",
        eth_rpc_url="http://127.0.0.1:9",
        chain_id=market.w3.eth.chain_id,
        contract_address=market.address,
        policy=BidPolicy(price_per_round_wei=1),
    )
    node = Node(home=home, config=config, account=account, store=store)
    node.__dict__["market"] = market  # the test's client (Node.market is a cached property)
    return node
