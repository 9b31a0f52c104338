"""The aggregator's side of a task: publish the initial model, then aggregate each round."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

from chain.events import Reason, TaskState
from chain.fraud import ZERO_ID, Exclusion
from chain.selection import mask_of, positions_of
from core.errors import FlexError
from dataplane.client import fetch_model
from training.aggregation.base import RULE_COPY, RULE_LAYOUT, RULE_SAMPLES, Rejection, Update
from training.aggregation.functions import Weights
from training.catalogue import initial_weights
from training.errors import (
    WrongAuthorError,
    WrongKindError,
    WrongLayoutError,
    WrongModelRoundError,
    WrongTaskError,
)
from training.fixedpoint import dequantize, quantize
from training.scoring import fedavg_weight, junk, shapley, values_digest
from training.serialize import Header, Kind, decode, encode, id_hex
from training.spec import TaskSpec
from worker.node import Node
from worker.trainer import model_header, verified_spec
from worker.validation import ValidationUnavailableError, validation_set

log = logging.getLogger(__name__)


class RoundNotReadyError(FlexError):
    """Not every selected trainer has submitted yet and the submission window is open."""

    code = "round_not_ready"


# The reason stated on chain for each way an update is left out (docs/verifiable.md,
# "Exclusions"); any other failure to fetch or decode it is NOT_FETCHABLE.
HEADER_REASONS: dict[type[FlexError], Reason] = {
    WrongKindError: Reason.WRONG_KIND,
    WrongTaskError: Reason.WRONG_TASK,
    WrongModelRoundError: Reason.WRONG_ROUND,
    WrongAuthorError: Reason.WRONG_AUTHOR,
    WrongLayoutError: Reason.WRONG_LAYOUT,
}
RULE_REASONS = {
    RULE_LAYOUT: Reason.WRONG_LAYOUT,
    RULE_SAMPLES: Reason.SAMPLES_OUT_OF_RANGE,
    RULE_COPY: Reason.COPIED,
}


@dataclasses.dataclass(frozen=True)
class Left:
    """Why an update is left out: for the log ("code: message") and for the chain."""

    why: str
    reason: Reason
    evidence: str = ""

    @classmethod
    def of(cls, rejection: Rejection, *, code: str) -> Left:
        return cls(f"{code}: {rejection.reason}", RULE_REASONS[rejection.rule], rejection.evidence)


class NothingToAggregateError(FlexError):
    """No usable update arrived for the round."""

    code = "nothing_to_aggregate"


def _publish(
    node: Node,
    *,
    task_id: int,
    round_number: int,
    blob: bytes,
    mask: int,
    scores: Sequence[int] = (),
    exclusions: Sequence[Exclusion] = (),
) -> dict:
    model_id = id_hex(node.store.put(blob))
    tx = node.market.publish_global_model(
        sender=node.account,
        task_id=task_id,
        round_number=round_number,
        model_id=model_id,
        aggregated_mask=mask,
        scores=scores,
        exclusions=exclusions,
    )
    return {"model_id": model_id, "tx_hash": tx.tx_hash, "gas_used": tx.gas_used}


def publish_initial(node: Node, *, task_id: int, spec: dict) -> dict | None:
    """Publish the round-0 model, built from the spec alone; skip if it is already on chain."""
    parsed = verified_spec(node, task_id=task_id, spec=spec)
    if node.market.global_model(task_id=task_id, round_number=0):
        return None
    header = model_header(node, spec=parsed, task_id=task_id, round_number=0, kind=Kind.GLOBAL)
    blob = encode(header, quantize(initial_weights(spec=parsed)))
    published = _publish(node, task_id=task_id, round_number=0, blob=blob, mask=0)
    log.info("task %s: initial model %s published", task_id, published["model_id"])
    return {"task_id": task_id, "round": 0, **published}


def _update(
    node: Node,
    *,
    update_id: str,
    expected: Header,
    peer: tuple[str, str] | None,
    samples: int,
) -> Update | Left:
    """One trainer's update, checked against its ID and against ``expected``, the header an
    update of this trainer, task and round carries; or why it is left out."""
    try:
        if node.store.has(update_id):
            model = node.store.load(update_id)
        elif not peer:
            return Left("update_unavailable: no data-plane address known", Reason.NOT_FETCHABLE)
        else:
            blob = fetch_model(
                base_url=peer[0],
                cert_sha256=peer[1],
                model_id=update_id,
                server_address=expected.trainer,
                account=node.account,
                max_bytes=node.config.max_model_bytes,
            )
            model = decode(blob, expected_id=update_id)
            node.store.put(blob, expected_id=model.model_id)
        # A copy of another trainer's update, an old one of its own, a global model: the
        # header says so, whoever holds the bytes.
        model.header.check(expected)
    except FlexError as exc:
        reason = HEADER_REASONS.get(type(exc), Reason.NOT_FETCHABLE)
        return Left(f"{exc.code}: {exc.message}", reason)
    return Update(weights=model.values, num_examples=samples, update_id=update_id)


def _prefetch(
    node: Node, *, task_id: int, update_id: str | None, trainer: str, peer: tuple[str, str] | None
) -> None:
    """Bring a submitted update into this node's store now; failures wait for the round."""
    if not peer or not update_id or node.store.has(update_id):
        return
    try:
        blob = fetch_model(
            base_url=peer[0],
            cert_sha256=peer[1],
            model_id=update_id,
            server_address=trainer,
            account=node.account,
            max_bytes=node.config.max_model_bytes,
            retries=0,
        )
        node.store.put(blob, expected_id=update_id)
    except FlexError as exc:
        log.info("task %s: update of %s not fetched yet: %s", task_id, trainer, exc.message)


@dataclasses.dataclass
class _Known:
    """What an update of a task must not copy, as far as round ``through``: the values digest
    of each earlier update and each global model so far -> what it is, and -> its model ID."""

    through: int
    names: dict[bytes, str] = dataclasses.field(default_factory=dict)
    ids: dict[bytes, str] = dataclasses.field(default_factory=dict)


# By (chain, contract, task), in this process: each model is read and digested once, and a
# round lists only its own rows and the round before's, however long the task has run. The
# tasks aggregated most recently, at most KNOWN_TASKS of them: one let go (settled, or quiet
# for that long) is read from the store again if it comes back.
_KNOWN: dict[tuple[int, str, int], _Known] = {}
KNOWN_TASKS = 32


def _known_models(
    node: Node, *, task_id: int, round_number: int
) -> tuple[dict[bytes, str], dict[bytes, str]]:
    """Values digest -> name, and digest -> model ID, of every model of this task the store
    holds that an update of ``round_number`` must not copy: every global model so far and
    every earlier update (the updates of a round are in the store by the time it closes)."""
    chain_id, contract = node.config.chain_id, node.config.contract_address
    key = (chain_id, contract.lower(), task_id)
    known = _KNOWN.pop(key, None)
    if known is None or known.through > round_number:
        known = _Known(through=-1)
    _KNOWN[key] = known  # the most recent, last
    while len(_KNOWN) > KNOWN_TASKS:
        del _KNOWN[next(iter(_KNOWN))]
    for number in range(max(known.through, 0), round_number + 1):
        for meta in node.store.list(
            chain_id=chain_id, contract=contract, task_id=task_id, round_number=number
        ):
            if meta.kind == "update" and number >= round_number:
                continue
            if meta.kind == "global" and number <= known.through:
                continue
            digest = values_digest(node.store.load(meta.model_id).values)
            what = "global model" if meta.kind == "global" else f"{meta.trainer}'s update"
            known.names.setdefault(digest, f"round {number}'s {what}")
            known.ids.setdefault(digest, meta.id_hex)
    known.through = round_number
    return known.names, known.ids


def _scores(
    node: Node,
    *,
    spec: TaskSpec,
    task_id: int,
    round_number: int,
    updates: list[Update],
    reference: Weights,
) -> dict[str, int]:
    """Each update's uint16 Shapley score on the task's validation set (update ID -> score),
    or nothing when the task names no validation set or it cannot be had."""
    from training.evaluate import evaluate_many

    if spec.validation is None or not updates:
        return {}
    try:
        data = validation_set(node, spec=spec, task_id=task_id)
    except ValidationUnavailableError as exc:
        log.warning("task %s: updates not scored: %s", task_id, exc.message)
        return {}
    scored = shapley(
        updates,
        strategy=spec.strategy(),
        reference=reference,
        losses_of=lambda sets: [
            e.loss
            for e in evaluate_many(spec=spec, weight_sets=[dequantize(w) for w in sets], data=data)
        ],
        seed=(spec.seed, task_id, round_number),
    )
    log.info(
        "task %s round %s: scored %d update(s) by %d evaluation(s)",
        task_id,
        round_number,
        len(updates),
        scored.evaluations,
    )
    return scored.scores


def aggregate(
    node: Node,
    *,
    task_id: int,
    round_number: int,
    spec: dict,
    trainer_urls: dict[str, str],
    trainer_certs: dict[str, str],
    wait: bool = True,
) -> dict | None:
    """Aggregate round ``round_number``'s updates into global model ``round_number + 1``,
    fetching each from its trainer's data plane (URL and pinned certificate by address).

    With ``wait``, raises RoundNotReadyError (with the seconds left) while trainers may still
    submit. An update that cannot be fetched or does not verify is left out and reported; a
    trainer that vanished is simply not in the mask, and so not paid for the round. So is an
    update whose header does not name its submitter, this task and this round as an update:
    a copy, a stale update, a global model (docs/verifiable.md); and one whose values copy a
    model this node already holds for the task. The rest are scored on the task's validation
    set and the scores published with the mask (docs/scoring.md).
    """
    from training.evaluate import evaluate  # TensorFlow loads only where evaluation happens

    market = node.market
    task, info = market.at_once(
        lambda: market.task(task_id=task_id),
        lambda: market.round_info(task_id=task_id, round_number=round_number),
    )
    parsed = verified_spec(node, task_id=task_id, spec=spec, task=task)
    if task.state != TaskState.RUNNING or task.current_round != round_number:
        log.info("task %s: round %s is not open for aggregation; skipping", task_id, round_number)
        return None
    selection, opened = market.round_opening(
        task_id=task_id, task=task, global_id=info.global_model
    )
    submitted = positions_of(info.submitted_mask)
    certs = {k.lower(): v for k, v in trainer_certs.items()}
    peers = {k.lower(): (v, certs.get(k.lower(), "")) for k, v in trainer_urls.items()}
    # Every update ID of the round in one read of its events.
    update_ids = market.updates_of(task_id=task_id, round_number=round_number, opened=opened)
    # The contract takes a partial round only after its window: at the deadline it is open.
    missing = len(submitted) < len(selection.trainers)
    if wait and missing and (open_s := task.submission_deadline - node.chain_time()) >= 0:
        # Fetch what is in already while the rest train: the round then closes sooner, and an
        # update stays usable even if its device vanishes before the round closes.
        for position in submitted:
            trainer = selection.trainers[position]
            _prefetch(
                node,
                task_id=task_id,
                update_id=update_ids.get(trainer),
                trainer=trainer,
                peer=peers.get(trainer.lower()),
            )
        raise RoundNotReadyError(
            task_id=task_id,
            round=round_number,
            submitted=len(submitted),
            expected=len(selection.trainers),
            seconds_left=open_s,
        )
    started = time.perf_counter()
    samples = selection.samples
    updates: list[Update] = []
    # Accepted headers name distinct trainers, so their update IDs are distinct too.
    authors: dict[str, tuple[str, int]] = {}
    left: dict[str, Left] = {}
    for position in submitted:
        trainer = selection.trainers[position]
        update_id = update_ids.get(trainer)
        expected = model_header(
            node,
            spec=parsed,
            task_id=task_id,
            round_number=round_number,
            kind=Kind.UPDATE,
            trainer=trainer,
        )
        got = _update(
            node,
            update_id=update_id,
            expected=expected,
            peer=peers.get(trainer.lower()),
            samples=samples[trainer],
        )
        if isinstance(got, Left):
            left[trainer] = got
            continue
        updates.append(got)
        authors[got.update_id] = (trainer, position)
    reference = node.store.load(info.global_model)
    strategy = parsed.strategy()
    screening = strategy.screen(updates, reference=reference.values)
    for rejection in screening.rejected:
        left[authors[rejection.update_id][0]] = Left.of(rejection, code="update_screened_out")
    # Ascending position order: the order the contract takes the scores in.
    candidates = sorted(screening.accepted, key=lambda u: authors[u.update_id][1])
    known, known_ids = _known_models(node, task_id=task_id, round_number=round_number)
    copies = junk(candidates, known=known, known_ids=known_ids)
    for rejection in copies.rejected:
        left[authors[rejection.update_id][0]] = Left.of(rejection, code="update_copied")
    accepted = copies.kept
    rejected = {who: out.why for who, out in left.items()}
    for who, why in rejected.items():
        log.warning("task %s round %s: left out %s: %s", task_id, round_number, who, why)
    if not accepted:
        raise NothingToAggregateError(task_id=task_id, round=round_number, rejected=rejected)
    scores = _scores(
        node,
        spec=parsed,
        task_id=task_id,
        round_number=round_number,
        updates=accepted,
        reference=reference.values,
    )
    # Each update weighs its samples scaled by its score (training.scoring.fedavg_weight).
    weights = strategy.aggregate(
        [
            dataclasses.replace(
                u, num_examples=fedavg_weight(u.num_examples, scores.get(u.update_id))
            )
            for u in accepted
        ]
    )
    if weights is None:
        raise NothingToAggregateError(task_id=task_id, round=round_number, rejected=rejected)
    evaluation = evaluate(spec=parsed, weights=dequantize(weights))
    mask = mask_of(authors[u.update_id][1] for u in accepted)
    header = model_header(
        node, spec=parsed, task_id=task_id, round_number=round_number + 1, kind=Kind.GLOBAL
    )
    published = _publish(
        node,
        task_id=task_id,
        round_number=round_number + 1,
        blob=encode(header, weights),
        mask=mask,
        scores=[scores[u.update_id] for u in accepted] if scores else (),
        exclusions=[
            Exclusion(p, left[t].reason, left[t].evidence or ZERO_ID)
            for p, t in enumerate(selection.trainers)
            if t in left
        ],
    )
    log.info(
        "task %s: round %s aggregated %d update(s) into %s (accuracy %.4f, loss %.4f)",
        task_id,
        round_number,
        len(accepted),
        published["model_id"],
        evaluation.accuracy,
        evaluation.loss,
    )
    return {
        "task_id": task_id,
        "round": round_number + 1,
        "updates": len(accepted),
        "rejected": rejected,
        "scores": {authors[u][0]: s for u, s in scores.items()},
        "accuracy": evaluation.accuracy,
        "loss": evaluation.loss,
        "aggregate_s": time.perf_counter() - started,
        **published,
    }
