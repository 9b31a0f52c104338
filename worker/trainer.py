"""The trainer's side of a task: decide and place a bid, train a round, submit the update ID."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from chain.errors import (
    AlreadySubmittedError,
    BiddingClosedError,
    InvalidTaskStateError,
    SubmissionClosedError,
)
from chain.events import Role, TaskState
from chain.records import RoundInfo, TaskInfo
from core.errors import FlexError
from dataplane.audit import Aggregator
from dataplane.client import fetch_model
from training.errors import DatasetError
from training.fixedpoint import quantize
from training.serialize import ZERO_ADDRESS, Header, Kind, ModelBlob, decode, encode, id_hex
from training.spec import TaskSpec
from worker.node import Node
from worker.watcher import watch_exclusion, watch_round, yielding

log = logging.getLogger(__name__)


class SpecMismatchError(FlexError):
    """The spec sent with the work does not hash to the task's spec hash on chain."""

    code = "spec_mismatch"


@dataclass(frozen=True)
class BidDecision:
    role: Role
    price_per_round_wei: int
    samples: int


def verified_spec(
    node: Node, *, task_id: int, spec: dict, task: TaskInfo | None = None
) -> TaskSpec:
    """The task's spec, after checking it against the hash the buyer put on chain (in
    ``task``, the task as just read, when the caller has it)."""
    parsed = TaskSpec.from_dict(spec)
    on_chain = (task or node.market.task(task_id=task_id)).spec_hash
    if parsed.hash_hex.lower() != on_chain.lower():
        raise SpecMismatchError(task_id=task_id, on_chain=on_chain, received=parsed.hash_hex)
    return parsed


def decide_bid(node: Node, *, task_id: int, spec: TaskSpec) -> BidDecision | None:
    """What this node offers for the task under its policy, or None (and why, in the log)."""
    task = node.market.task(task_id=task_id)
    policy = node.config.policy
    if task.state != TaskState.BIDDING or task.bidding_ends <= node.chain_time():
        log.info("task %s: bidding is closed", task_id)
        return None
    if task.budget_wei < policy.min_budget_wei:
        log.info("task %s: budget %s wei is below this node's minimum", task_id, task.budget_wei)
        return None
    if node.config.may_aggregate and policy.aggregator_price_per_round_wei is not None:
        if not _affords(node, task_id=task_id, deposit_wei=task.aggregator_bond_wei):
            return None
        price = max(policy.aggregator_price_per_round_wei, task.min_aggregator_price_wei)
        return BidDecision(role=Role.AGGREGATOR, price_per_round_wei=price, samples=1)
    if not _affords(node, task_id=task_id, deposit_wei=task.trainer_stake_wei):
        return None
    try:
        data = node.data_for(spec.dataset)
    except DatasetError as exc:
        log.info("task %s: no data in schema %s here: %s", task_id, spec.dataset, exc.message)
        return None
    price = max(policy.price_per_round_wei, task.min_trainer_price_wei)
    if price * task.rounds > task.budget_wei:
        log.info("task %s: %s rounds at %s wei exceed the budget", task_id, task.rounds, price)
        return None
    return BidDecision(role=Role.TRAINER, price_per_round_wei=price, samples=len(data))


def _affords(node: Node, *, task_id: int, deposit_wei: int) -> bool:
    """Whether this node's account holds the bid's deposit (its gas comes on top)."""
    balance = node.market.w3.eth.get_balance(node.address)
    if balance < deposit_wei:
        log.info(
            "task %s: the deposit of %s wei is more than this node's %s wei",
            task_id,
            deposit_wei,
            balance,
        )
        return False
    return True


def bid(node: Node, *, task_id: int, spec: dict) -> BidDecision | None:
    """Decide and place (or keep) this node's bid, paying in the task's stake (or bond, to
    aggregate); safe to run twice."""
    parsed = verified_spec(node, task_id=task_id, spec=spec)
    decision = decide_bid(node, task_id=task_id, spec=parsed)
    if decision is None:
        return None
    index = node.market.bid_index_of(task_id=task_id, device=node.address)
    if index is not None:
        placed = node.market.bids(task_id=task_id)[index]
        # The chain keeps a claim capped at the task's sample cap.
        cap = node.market.task(task_id=task_id).sample_cap
        if (placed.role, placed.price_per_round_wei, placed.samples) == (
            decision.role,
            decision.price_per_round_wei,
            min(decision.samples, cap),
        ):
            return decision
    try:
        node.market.place_bid(
            sender=node.account,
            task_id=task_id,
            price_per_round_wei=decision.price_per_round_wei,
            samples=decision.samples,
            role=decision.role,
        )
    except (BiddingClosedError, InvalidTaskStateError) as exc:
        # Bidding closed between the decision and the transaction: too late, nothing wrong.
        log.info("task %s: bid not placed, bidding closed first (%s)", task_id, exc.code)
        return None
    log.info(
        "task %s: bid %s wei/round as %s with %s samples",
        task_id,
        decision.price_per_round_wei,
        decision.role.name.lower(),
        decision.samples,
    )
    return decision


def model_header(
    node: Node,
    *,
    spec: TaskSpec,
    task_id: int,
    round_number: int,
    kind: Kind,
    trainer: str = ZERO_ADDRESS,
) -> Header:
    """The header a model of this node's chain and contract, task ``task_id`` and round
    ``round_number`` carries (docs/verifiable.md): an update names its ``trainer``."""
    return Header(
        kind=kind,
        chain_id=node.config.chain_id,
        contract=node.config.contract_address,
        task_id=task_id,
        round_number=round_number,
        trainer=trainer,
        shapes=tuple(spec.model_entry.weight_shapes()),
    )


def global_model(
    node: Node,
    *,
    spec: TaskSpec,
    task_id: int,
    round_number: int,
    model_id: str,
    source_url: str,
    source_cert: str,
    source: str,
) -> ModelBlob:
    """Global model ``round_number`` from this node's store, else fetched from ``source``'s
    data plane at ``source_url`` (whose certificate must be ``source_cert``); checked against
    ``model_id`` and against the header of this task's round (a HeaderMismatchError subclass
    if it names another)."""
    if node.store.has(model_id):
        model = node.store.load(model_id)
    else:
        blob = fetch_model(
            base_url=source_url,
            cert_sha256=source_cert,
            model_id=model_id,
            server_address=source,
            account=node.account,
            max_bytes=node.config.max_model_bytes,
        )
        model = decode(blob, expected_id=model_id)
        node.store.put(blob, expected_id=model.model_id)
    expected = model_header(
        node, spec=spec, task_id=task_id, round_number=round_number, kind=Kind.GLOBAL
    )
    model.header.check(expected)
    return model


def train(
    node: Node,
    *,
    task_id: int,
    round_number: int,
    spec: dict,
    aggregator_url: str,
    aggregator_cert: str,
) -> dict | None:
    """Train round ``round_number`` from its global model and submit the update's ID, then
    check that model against this node's update of the round before (see _watch): the round
    goes on without waiting for the check, and a wrong aggregate is still challenged within
    its dispute window (the result then also names it).

    Does nothing when the round is not the task's current one or this node's update for it
    is already on chain, so a redelivered message changes nothing. For the final model
    (``round_number`` = the task's rounds, the task Trained) there is nothing to train: the
    node only checks it, within its dispute window.
    """
    market = node.market
    # Everything the round needs from the chain, in one request: the task, this round and
    # the one its model closed (what the check below compares), and this node's place.
    task, info, closed, position = market.at_once(
        lambda: market.task(task_id=task_id),
        lambda: market.round_info(task_id=task_id, round_number=round_number),
        lambda: market.round_info(task_id=task_id, round_number=max(round_number - 1, 0)),
        lambda: market.trainer_position(task_id=task_id, device=node.address),
    )
    parsed = verified_spec(node, task_id=task_id, spec=spec, task=task)
    aggregator = Aggregator(
        address=task.aggregator, url=aggregator_url, cert_sha256=aggregator_cert
    )
    if task.state == TaskState.TRAINED and round_number == task.rounds:
        final = global_model(
            node,
            spec=parsed,
            task_id=task_id,
            round_number=round_number,
            model_id=info.global_model,
            source_url=aggregator_url,
            source_cert=aggregator_cert,
            source=task.aggregator,
        )
        return _watch(
            node,
            spec=parsed,
            task=task,
            task_id=task_id,
            model=final,
            aggregator=aggregator,
            position=position,
            closed=closed,
        )
    if task.state != TaskState.RUNNING or task.current_round != round_number:
        log.info("task %s: round %s is not the current round; skipping", task_id, round_number)
        return None
    if _submitted(position, info):
        log.info("task %s: update for round %s already on chain", task_id, round_number)
        return None
    stored = node.store.list(
        kind="update",
        chain_id=node.config.chain_id,
        contract=node.config.contract_address,
        task_id=task_id,
        round_number=round_number,
        trainer=node.address,
    )
    if stored:
        # Trained before but the submission did not land: submit that update, don't retrain.
        tx = _submit(node, task_id=task_id, round_number=round_number, update_id=stored[0].id_hex)
        if tx is None:
            return None
        log.info("task %s: resubmitted stored update %s", task_id, stored[0].id_hex)
        return {
            "task_id": task_id,
            "round": round_number,
            "device": node.address,
            "update_id": stored[0].id_hex,
            "tx_hash": tx.tx_hash,
            "gas_used": tx.gas_used,
        }
    model = global_model(
        node,
        spec=parsed,
        task_id=task_id,
        round_number=round_number,
        model_id=info.global_model,
        source_url=aggregator_url,
        source_cert=aggregator_cert,
        source=task.aggregator,
    )
    from training.local import train_round  # TensorFlow loads only where training happens

    started = time.perf_counter()
    result = train_round(
        spec=parsed,
        weights=model.floats(),
        data=node.data_for(parsed.dataset),
        round_number=round_number,
    )
    train_s = time.perf_counter() - started
    header = model_header(
        node,
        spec=parsed,
        task_id=task_id,
        round_number=round_number,
        kind=Kind.UPDATE,
        trainer=node.address,
    )
    update_id = id_hex(node.store.put(encode(header, quantize(result.weights))))
    tx = _submit(node, task_id=task_id, round_number=round_number, update_id=update_id)
    if tx is None:
        return None
    log.info(
        "task %s: round %s trained in %.2fs on %s samples (loss %.4f, accuracy %.4f); "
        "update %s submitted in %s",
        task_id,
        round_number,
        train_s,
        result.num_examples,
        result.metrics["loss"],
        result.metrics["accuracy"],
        update_id,
        tx.tx_hash,
    )
    trained = {
        "task_id": task_id,
        "round": round_number,
        "device": node.address,
        "update_id": update_id,
        "num_examples": result.num_examples,
        "metrics": result.metrics,
        "train_s": train_s,
        "tx_hash": tx.tx_hash,
        "gas_used": tx.gas_used,
    }
    disputed = _watch(
        node,
        spec=parsed,
        task=task,
        task_id=task_id,
        model=model,
        aggregator=aggregator,
        position=position,
        closed=closed,
    )
    return trained if disputed is None else {**trained, **disputed}


def _submit(node: Node, *, task_id: int, round_number: int, update_id: str):
    """Send the update's ID; None when the round closed first (a late update: the round went
    on without it, nothing to retry) or this node's update for the round landed meanwhile
    (the same work delivered twice and run side by side), else the transaction."""
    try:
        return node.market.submit_update(
            sender=node.account, task_id=task_id, round_number=round_number, model_id=update_id
        )
    except AlreadySubmittedError:
        log.info("task %s: update for round %s already on chain", task_id, round_number)
        return None
    except (SubmissionClosedError, InvalidTaskStateError) as exc:
        log.info(
            "task %s: update %s for round %s not submitted, the round closed first (%s)",
            task_id,
            update_id,
            round_number,
            exc.code,
        )
        return None


def _submitted(position: int | None, info: RoundInfo) -> bool:
    """Whether the trainer at selection ``position`` (None: not selected) has its update
    among those ``info`` (a round of the task) records."""
    return position is not None and bool(info.submitted_mask >> position & 1)


@yielding
def _watch(
    node: Node,
    *,
    spec: TaskSpec,
    task: TaskInfo,
    task_id: int,
    model: ModelBlob,
    aggregator: Aggregator,
    position: int | None,
    closed: RoundInfo,
) -> dict | None:
    """When this node (at selection ``position``) submitted an update to the round global
    model ``model`` closes (``closed``, as the chain has it once that model is out), check
    the aggregate (worker.watcher.watch_round) and, if its update was left out, the reason
    (watch_exclusion); each sends its own proof. The round and the task (``task``) are read
    from the chain once for the whole train. The result when the aggregator was shown wrong,
    else None. Runs below the priority of training and aggregation (watcher.yielding)."""
    round_closed = model.header.round_number - 1
    if round_closed < 0 or position is None or not _submitted(position, closed):
        return None
    common = {
        "market": node.market,
        "store": node.store,
        "account": node.account,
        "task_id": task_id,
        "round_number": round_closed,
        "published": model,
        "aggregator": aggregator,
        "info": closed,
    }
    watch = watch_round(spec=spec, task=task, **common)
    if watch is not None and not watch.correct:
        return {"task_id": task_id, "round": round_closed + 1, "challenged": watch.global_model}
    contested = watch_exclusion(position=position, **common)
    if contested is not None:
        return {"task_id": task_id, "round": round_closed + 1, "contested": contested.tx_hash}
    return None
