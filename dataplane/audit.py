"""Check a global model against its updates and, where it differs, build the fraud proof.

Anyone holding the blobs can do this (docs/verifiable.md): the aggregate is exact integer
arithmetic, so a recomputation equals the published model to the bit or the aggregator lied.
The challenge names the first coordinate that differs and opens its chunk in every model.
A party without the blobs (a trainer, the buyer) checks chunk by chunk instead
(``check_round``): one chunk of each included update at a time, fetched with its proof from
the aggregator's data plane, so a check costs (chunks x updates) small requests, never a
whole update. Nothing here sends a transaction: a trainer's worker and the platform act on
what it finds.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Hashable, MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np
from eth_account.signers.local import LocalAccount

from chain.client import FlexMarket
from chain.fraud import Challenge, Included, RoundContext, Strategy
from chain.records import RoundInfo, SelectionInfo, TaskInfo
from chain.selection import positions_of
from core.errors import FlexError
from dataplane.client import fetch_openings, opening_bytes
from dataplane.protocol import MAX_OPENED_MODELS, MAX_OPENINGS
from training.aggregation import STRATEGIES, Update
from training.aggregation import Strategy as Rule
from training.aggregation.functions import MAX_SAMPLES
from training.scoring import fedavg_weight
from training.serialize import ChunkOpening, Header, Kind, ModelBlob, id_hex
from training.spec import TaskSpec
from training.store import ModelStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IncludedBlob:
    """An update the global model includes, with its bytes and its weight on chain."""

    blob: ModelBlob
    trainer: str
    weight: int


def round_weights(selection: SelectionInfo, info: RoundInfo) -> dict[str, int]:
    """The FedAvg weight of each update global model r + 1 aggregated (``info`` is round r's),
    by trainer: its recorded samples (``selection``'s) scaled by its score on chain
    (training.scoring.fedavg_weight): what the aggregator weighs with and a challenge is
    checked by."""
    positions = positions_of(info.aggregated_mask)
    scores = dict(zip(positions, info.scores, strict=True)) if info.scores else {}
    return {
        selection.trainers[p]: fedavg_weight(selection.trainer_samples[p], scores.get(p))
        for p in positions
    }


def recompute(
    included: Sequence[IncludedBlob], *, strategy: str, params: dict | None = None
) -> list[np.ndarray]:
    """The aggregate the task's strategy gives over ``included``, in their order."""
    rule = STRATEGIES[strategy].from_params(dict(params or {}))
    updates = [Update(weights=u.blob.values, num_examples=u.weight) for u in included]
    return rule.aggregate(updates)


def first_difference(published: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> int | None:
    """The flat index of the first value where two models differ, or None when they are equal."""
    offset = 0
    for a, b in zip(published, expected, strict=True):
        unequal = np.flatnonzero(np.ravel(a) != np.ravel(b))
        if unequal.size:
            return offset + int(unequal[0])
        offset += int(np.size(a))
    return None


def challenge(
    *,
    context: RoundContext,
    published: ModelBlob,
    included: Sequence[IncludedBlob],
    index: int,
) -> Challenge:
    """The challenge of value ``index`` (flat) of ``published`` against ``included``."""
    per_chunk = published.header.chunk_values
    chunk, offset = divmod(index, per_chunk)
    return Challenge(
        context=context,
        global_id=id_hex(published.model_id),
        included=tuple(
            Included(model_id=id_hex(u.blob.model_id), trainer=u.trainer, weight=u.weight)
            for u in included
        ),
        chunk=chunk,
        offset=offset,
        global_opening=published.opening(chunk),
        updates=tuple(u.blob.opening(chunk) for u in included),
    )


def context_of(published: ModelBlob, *, strategy: str, params: dict | None = None) -> RoundContext:
    """The round ``published`` closes, as its header names it, under the task's strategy."""
    header = published.header
    params = STRATEGIES[strategy].from_params(dict(params or {})).params()
    return RoundContext(
        chain_id=header.chain_id,
        market=header.contract,
        task_id=header.task_id,
        round_number=header.round_number - 1,
        strategy=Strategy.of(strategy),
        trim_per_mille=int(params.get("trim_per_mille", 0)),
    )


# Chunks checked per round: every chunk of a model up to this many, a random sample beyond.
WATCH_CHUNKS = 64
# Checks a memo keeps (check_round): a host's nodes check a round within moments of each other.
MEMO_ROUNDS = 64
# About how many values one request for openings brings back: the chunks of as many updates
# as fit (a round of a small model in a request or two, one update of a large one).
OPENINGS_REQUEST_VALUES = 1 << 20


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
    store: ModelStore | None,
    account: LocalAccount,
    spec: TaskSpec,
    task_id: int,
    round_number: int,
    published: ModelBlob,
    aggregator: Aggregator,
    limit: int = WATCH_CHUNKS,
    rng: random.Random | None = None,
    info: RoundInfo | None = None,
    task: TaskInfo | None = None,
    memo: MutableMapping[Hashable, Watch] | None = None,
) -> Watch:
    """Check ``published`` (global model ``round_number + 1``) against the updates its mask
    names; chunks of updates this node holds are read from ``store`` (None: none), the rest
    fetched from the aggregator's data plane (a DataPlaneError when it will not serve them).
    ``limit`` chunks at most are checked (every chunk when the model has no more). ``info``
    is round ``round_number`` and ``task`` the task as the caller just read them (else they
    are read here).

    ``memo`` keeps what each check found, by everything it depends on: the published model's
    ID, the round's context and each included update's ID, trainer and weight on chain (the
    blobs are checked against those IDs). A check of the same round with the same memo, by
    another node of the same host, is answered from it without fetching anything."""
    if info is None:
        info = market.round_info(task_id=task_id, round_number=round_number)
    if task is None:
        task = market.task(task_id=task_id)
    selection, opened = market.round_opening(
        task_id=task_id, task=task, global_id=info.global_model
    )
    weights = round_weights(selection, info)
    update_ids = market.updates_of(task_id=task_id, round_number=round_number, opened=opened)
    included = []
    for position in positions_of(info.aggregated_mask):
        trainer = selection.trainers[position]
        included.append(
            Included(model_id=update_ids.get(trainer), trainer=trainer, weight=weights[trainer])
        )
    header = published.header
    params = dict(spec.aggregation.params)
    context = context_of(published, strategy=spec.aggregation.strategy, params=params)
    rule = STRATEGIES[spec.aggregation.strategy].from_params(params)
    global_id = id_hex(published.model_id)
    key = (global_id, context, tuple(included), limit)
    if memo is not None and key in memo:
        log.info(
            "task %s: global model %s of round %s already checked on this host",
            task_id,
            global_id,
            round_number + 1,
        )
        return memo[key]
    chunks = sample_chunks(header.leaf_count, limit=limit, rng=rng or random.SystemRandom())
    # Every sampled chunk of many updates in one request, all over this thread's kept-alive
    # connection to the aggregator (dataplane.client.kept_pool).
    fetched = openings(
        store,
        account,
        aggregator,
        [u.model_id for u in included],
        chunks,
        chunk_values=header.chunk_values,
    )
    wrong = _first_wrong(fetched, published, chunks, included, rule, round_number)
    if wrong is None:
        log.info(
            "task %s: global model %s of round %s checked on %d of %d chunk(s)",
            task_id,
            global_id,
            round_number + 1,
            len(chunks),
            header.leaf_count,
        )
        watch = Watch(
            task_id=task_id,
            round_number=round_number,
            global_model=global_id,
            chunks_checked=tuple(chunks),
            chunks=header.leaf_count,
            challenge=None,
        )
    else:
        at, offset = wrong
        chunk = chunks[at]
        log.warning(
            "task %s: global model %s of round %s is wrong at chunk %s, value %s",
            task_id,
            global_id,
            round_number + 1,
            chunk,
            offset,
        )
        watch = Watch(
            task_id=task_id,
            round_number=round_number,
            global_model=global_id,
            chunks_checked=tuple(chunks[: at + 1]),
            chunks=header.leaf_count,
            challenge=Challenge(
                context=context,
                global_id=global_id,
                included=tuple(included),
                chunk=chunk,
                offset=offset,
                global_opening=published.opening(chunk),
                updates=tuple(of_update[at] for of_update in fetched),
            ),
        )
    if memo is not None:
        while len(memo) >= MEMO_ROUNDS:
            del memo[next(iter(memo))]  # the oldest check: its round is long settled
        memo[key] = watch
    return watch


def openings(
    store: ModelStore | None,
    account: LocalAccount,
    aggregator: Aggregator,
    model_ids: Sequence[str],
    chunks: Sequence[int],
    *,
    chunk_values: int = 1 << 16,
) -> list[list[ChunkOpening]]:
    """Chunks ``chunks`` of each of ``model_ids`` with their proofs, model by model: from
    ``store`` for the models it holds, the rest from the aggregator's data plane (checked
    against their IDs there), as many models to a request as keep its answer near
    OPENINGS_REQUEST_VALUES for chunks of ``chunk_values`` values, over this thread's kept
    connection to it."""
    found: dict[str, list[ChunkOpening]] = {}
    remote = []
    for model_id in dict.fromkeys(model_ids):
        if store is not None and store.has(model_id):
            found[model_id] = store.openings(model_id, chunks)
        else:
            remote.append(model_id)
    per_request = OPENINGS_REQUEST_VALUES // (len(chunks) * chunk_values)
    per_request = max(1, min(MAX_OPENED_MODELS, per_request))
    for first in range(0, len(remote), per_request):
        batch = remote[first : first + per_request]
        for start in range(0, len(chunks), MAX_OPENINGS):
            fetched = fetch_openings(
                base_url=aggregator.url,
                cert_sha256=aggregator.cert_sha256,
                model_ids=batch,
                indexes=chunks[start : start + MAX_OPENINGS],
                server_address=aggregator.address,
                account=account,
                opening_bytes=opening_bytes(chunk_values),
            )
            for model_id, of_model in zip(batch, fetched, strict=True):
                found.setdefault(model_id, []).extend(of_model)
    return [found[m] for m in model_ids]


def _first_wrong(
    fetched: Sequence[Sequence[ChunkOpening]],
    published: ModelBlob,
    chunks: Sequence[int],
    included: Sequence[Included],
    rule: Rule,
    round_number: int,
) -> tuple[int, int] | None:
    """Where ``published`` first differs from what ``rule`` makes of the included updates'
    openings (``fetched[k][i]``: update k's opening of ``chunks[i]``): (i, offset in that
    chunk), offset 0 of the first chunk when an update may not be included at all; None
    when every sampled value holds. The strategies are coordinate-wise, so the sampled
    chunks are aggregated together, in one call."""
    if _invalid(fetched, included, published.header, round_number):
        return (0, 0)
    computed = rule.aggregate(
        [
            Update(weights=[np.concatenate([o.array() for o in of_update])], num_examples=u.weight)
            for of_update, u in zip(fetched, included, strict=True)
        ]
    )[0]
    claimed = np.concatenate([published.opening(c).array() for c in chunks])
    differs = (claimed != computed).nonzero()[0]
    if not differs.size:
        return None
    first = int(differs[0])
    ends = np.cumsum([published.header.chunk_size(c) for c in chunks])
    at = int(np.searchsorted(ends, first, side="right"))
    return at, first - (int(ends[at - 1]) if at else 0)


def _invalid(
    fetched: Sequence[Sequence[ChunkOpening]],
    included: Sequence[Included],
    published: Header,
    round_number: int,
) -> bool:
    """Whether an included update is not one the aggregator may include (its header names
    another trainer, task, round, kind or layout, or its weight is outside the range the
    contract records): the contract then shows which, at offset 0. Each update's openings
    were checked against its ID as they were fetched, and the ID binds its header: one
    opening of each shows the header of all."""
    for openings_of, update in zip(fetched, included, strict=True):
        if not 1 <= update.weight <= MAX_SAMPLES:
            return True
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
            openings_of[0].check(update.model_id).check(expected)
        except FlexError:
            return True
    return False
