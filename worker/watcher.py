"""A participant's watch over an aggregate: recompute sampled chunks of a global model from
chunks of the updates it includes, fetched one at a time with their proofs.

A trainer holds the global model of each round it trains from; the updates it aggregated
are on the aggregator's data plane, which serves single chunks of them to the task's
parties. Checking a chunk needs that chunk of every included update, so a watch costs
(sampled chunks x updates) small requests, never a whole update. A value that differs, or
an included update whose header does not name its trainer, this task and this round, makes
the challenge that proves it on chain (docs/verifiable.md).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from eth_account.signers.local import LocalAccount

from chain.client import FlexMarket
from chain.errors import ContractError
from chain.fraud import Challenge, Included
from chain.selection import positions_of
from core.errors import FlexError
from dataplane.client import fetch_opening
from dataplane.protocol import DataPlaneError
from training.aggregation import STRATEGIES, Update
from training.aggregation.functions import MAX_SAMPLES
from training.serialize import ChunkOpening, Header, Kind, ModelBlob, id_hex
from training.spec import TaskSpec
from training.store import ModelStore
from worker.challenge import context_of, round_weights

log = logging.getLogger(__name__)

# Chunks checked per round: every chunk of a model up to this many, a random sample beyond.
WATCH_CHUNKS = 64


@dataclass(frozen=True)
class Aggregator:
    """Where the aggregator's data plane is: its address, URL and pinned certificate."""

    address: str
    url: str
    cert_sha256: str


@dataclass(frozen=True)
class Watch:
    """What checking global model ``round_number + 1`` found: the chunks checked (of how
    many) and, when the aggregate is wrong, the challenge that shows it."""

    task_id: int
    round_number: int
    global_model: str
    chunks_checked: tuple[int, ...]
    chunks: int
    challenge: Challenge | None

    @property
    def correct(self) -> bool:
        return self.challenge is None


def sample_chunks(count: int, *, limit: int, rng: random.Random) -> list[int]:
    """Every chunk index when there are at most ``limit``, else ``limit`` distinct ones drawn
    by ``rng`` (an aggregator cannot know which a watcher will check)."""
    if count <= limit:
        return list(range(count))
    return sorted(rng.sample(range(count), limit))


def check_round(
    *,
    market: FlexMarket,
    store: ModelStore,
    account: LocalAccount,
    spec: TaskSpec,
    task_id: int,
    round_number: int,
    published: ModelBlob,
    aggregator: Aggregator,
    limit: int = WATCH_CHUNKS,
    rng: random.Random | None = None,
) -> Watch:
    """Check ``published`` (global model ``round_number + 1``) against the updates its mask
    names; chunks of updates this node holds are read from ``store``, the rest fetched from
    the aggregator's data plane (a DataPlaneError when it will not serve them)."""
    info = market.round_info(task_id=task_id, round_number=round_number)
    selection = market.selection(task_id=task_id)
    weights = round_weights(
        market, task_id=task_id, round_number=round_number, trainers=selection.trainers
    )
    included = []
    for position in positions_of(info.aggregated_mask):
        trainer = selection.trainers[position]
        update_id = market.update_of(task_id=task_id, round_number=round_number, trainer=trainer)
        included.append(Included(model_id=update_id, trainer=trainer, weight=weights[trainer]))
    header = published.header
    params = dict(spec.aggregation.params)
    context = context_of(published, strategy=spec.aggregation.strategy, params=params)
    rule = STRATEGIES[spec.aggregation.strategy].from_params(params)
    chunks = sample_chunks(header.leaf_count, limit=limit, rng=rng or random.SystemRandom())
    global_id = id_hex(published.model_id)
    for chunk in chunks:
        openings = [_opening(store, account, aggregator, u.model_id, chunk) for u in included]
        claimed = published.opening(chunk)
        found = _invalid(openings, included, header, round_number)
        if found is None:
            computed = rule.aggregate(
                [
                    Update(weights=[o.array()], num_examples=u.weight)
                    for o, u in zip(openings, included, strict=True)
                ]
            )[0]
            differs = (claimed.array() != computed).nonzero()[0]
            found = int(differs[0]) if differs.size else None
        if found is not None:
            log.warning(
                "task %s: global model %s of round %s is wrong at chunk %s, value %s",
                task_id,
                global_id,
                round_number + 1,
                chunk,
                found,
            )
            return Watch(
                task_id=task_id,
                round_number=round_number,
                global_model=global_id,
                chunks_checked=tuple(chunks[: chunks.index(chunk) + 1]),
                chunks=header.leaf_count,
                challenge=Challenge(
                    context=context,
                    global_id=global_id,
                    included=tuple(included),
                    chunk=chunk,
                    offset=found,
                    global_opening=claimed,
                    updates=tuple(openings),
                ),
            )
    log.info(
        "task %s: global model %s of round %s checked on %d of %d chunk(s)",
        task_id,
        global_id,
        round_number + 1,
        len(chunks),
        header.leaf_count,
    )
    return Watch(
        task_id=task_id,
        round_number=round_number,
        global_model=global_id,
        chunks_checked=tuple(chunks),
        chunks=header.leaf_count,
        challenge=None,
    )


def _opening(
    store: ModelStore, account: LocalAccount, aggregator: Aggregator, model_id: str, chunk: int
) -> ChunkOpening:
    if store.has(model_id):
        return store.opening(model_id, chunk)
    return fetch_opening(
        base_url=aggregator.url,
        cert_sha256=aggregator.cert_sha256,
        model_id=model_id,
        index=chunk,
        server_address=aggregator.address,
        account=account,
    )


def _invalid(
    openings: Sequence[ChunkOpening],
    included: Sequence[Included],
    published: Header,
    round_number: int,
) -> int | None:
    """Offset 0 when an included update is not one the aggregator may include (its header
    names another trainer, task, round, kind or layout, or its weight is outside the range
    the contract records): the contract then shows which. Else None."""
    for opened, update in zip(openings, included, strict=True):
        if not 1 <= update.weight <= MAX_SAMPLES:
            return 0
        expected = Header(
            kind=Kind.UPDATE,
            chain_id=published.chain_id,
            contract=published.contract,
            task_id=published.task_id,
            round_number=round_number,
            trainer=update.trainer,
            shapes=published.shapes,
            scale_bits=published.scale_bits,
            chunk_values=published.chunk_values,
        )
        try:
            opened.check(update.model_id).check(expected)
        except FlexError:
            return 0
    return None


def watch_round(
    *,
    market: FlexMarket,
    store: ModelStore,
    account: LocalAccount,
    spec: TaskSpec,
    task_id: int,
    round_number: int,
    published: ModelBlob,
    aggregator: Aggregator,
) -> Watch | None:
    """A trainer's watch over global model ``round_number + 1``, which it fetched to train
    from: check it and, when it is wrong, send the challenge that proves it (the bond's
    bounty comes to this node). None when the check could not be made (an update's chunk
    not served): the round then stays unproven either way, and that is logged."""
    try:
        watch = check_round(
            market=market,
            store=store,
            account=account,
            spec=spec,
            task_id=task_id,
            round_number=round_number,
            published=published,
            aggregator=aggregator,
        )
    except DataPlaneError as exc:
        log.warning(
            "task %s: cannot check global model of round %s: %s (%s)",
            task_id,
            round_number + 1,
            exc.message,
            exc.code,
        )
        return None
    if watch.challenge is None:
        return watch
    try:
        tx = market.challenge(
            sender=account,
            task_id=task_id,
            round_number=round_number + 1,
            challenge=watch.challenge,
        )
    except ContractError as exc:
        # Someone else's challenge came first, or the window closed: nothing left to prove.
        log.warning(
            "task %s: challenge of round %s refused: %s (%s)",
            task_id,
            round_number + 1,
            exc.message,
            exc.code,
        )
        return watch
    log.warning(
        "task %s: challenged global model %s of round %s at chunk %s, value %s in %s: "
        "aggregator slashed",
        task_id,
        watch.global_model,
        round_number + 1,
        watch.challenge.chunk,
        watch.challenge.offset,
        tx.tx_hash,
    )
    return watch
