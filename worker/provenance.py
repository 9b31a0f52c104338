"""Provenance of a task's models from the chain and the blobs alone (no platform database).

For each round: which updates, from which trainers, with which weights and scores, the
global model aggregated; the global model recomputed from those updates by the task's
strategy, and its ID compared with the one on chain (round 0 from the spec alone). On a
mismatch, the first value that differs and the challenge that shows it on chain. Last, what
each account was credited for the task under the contract's rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chain.client import FlexMarket
from chain.events import PaymentCredited
from chain.records import SelectionInfo
from chain.selection import positions_of
from core.errors import FlexError
from dataplane.audit import (
    IncludedBlob,
    challenge,
    context_of,
    first_difference,
    recompute,
    round_weights,
)
from training.catalogue import initial_weights
from training.fixedpoint import quantize
from training.serialize import ZERO_ADDRESS, Header, Kind, ModelBlob, encode, id_hex, model_id
from training.spec import TaskSpec
from training.store import ModelStore
from worker.node import STORE_DIR

Blobs = Callable[[str], ModelBlob | None]


class SpecHashMismatchError(FlexError):
    """The spec given is not the one whose hash the task carries on chain."""

    code = "spec_mismatch"


def folder_blobs(folders: Sequence[Path]) -> Blobs:
    """Blobs from model stores: each folder a store's root or a device's home (its store).
    A blob is checked whole against its ID; one that is absent everywhere is None."""
    stores = []
    for folder in folders:
        root = folder / STORE_DIR if (folder / STORE_DIR).is_dir() else folder
        if not (root / "blobs").is_dir():
            raise FileNotFoundError(f"{folder} holds no model store (no blobs/ folder)")
        stores.append(ModelStore(root))

    def get(wanted: str) -> ModelBlob | None:
        for store in stores:
            if store.has(wanted):
                return store.load(wanted)
        return None

    return get


@dataclass
class RoundProvenance:
    """Global model ``round`` and what made it."""

    round: int
    global_model: str | None
    recomputed: str | None = None
    verified: bool = False
    made_from: str = "updates"
    updates: list[dict[str, Any]] = field(default_factory=list)
    left_out: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatch: dict[str, Any] | None = None


def _header(market: FlexMarket, *, spec: TaskSpec, task_id: int, round_number: int) -> Header:
    return Header(
        kind=Kind.GLOBAL,
        chain_id=market.w3.eth.chain_id,
        contract=market.address,
        task_id=task_id,
        round_number=round_number,
        trainer=ZERO_ADDRESS,
        shapes=tuple(spec.model_entry.weight_shapes()),
    )


def _initial(market: FlexMarket, *, spec: TaskSpec, task_id: int) -> RoundProvenance:
    on_chain = market.global_model(task_id=task_id, round_number=0)
    header = _header(market, spec=spec, task_id=task_id, round_number=0)
    again = id_hex(model_id(encode(header, quantize(initial_weights(spec=spec)))))
    return RoundProvenance(
        round=0,
        global_model=on_chain,
        recomputed=again,
        verified=on_chain is not None and again.lower() == on_chain.lower(),
        made_from="spec",
    )


def _round(
    market: FlexMarket,
    *,
    spec: TaskSpec,
    task_id: int,
    round_number: int,
    selection: SelectionInfo,
    blobs: Blobs,
) -> RoundProvenance:
    """Global model ``round_number + 1`` against the updates of ``round_number``."""
    info = market.round_info(task_id=task_id, round_number=round_number)
    published = market.global_model(task_id=task_id, round_number=round_number + 1)
    out = RoundProvenance(round=round_number + 1, global_model=published)
    aggregated = positions_of(info.aggregated_mask)
    scores = dict(zip(aggregated, info.scores, strict=False))
    weights = round_weights(selection, info)
    included: list[IncludedBlob] = []
    submitted = market.updates_of(task_id=task_id, round_number=round_number)
    for position in positions_of(info.submitted_mask):
        trainer = selection.trainers[position]
        update_id = submitted.get(trainer)
        entry = {"trainer": trainer, "position": position, "update_id": update_id}
        if position not in aggregated:
            out.left_out.append(entry)
            continue
        entry |= {"weight": weights[trainer], "score": scores.get(position)}
        out.updates.append(entry)
        blob = blobs(update_id)
        if blob is None:
            out.missing.append(update_id)
        else:
            included.append(IncludedBlob(blob=blob, trainer=trainer, weight=entry["weight"]))
    claimed = blobs(published) if published else None
    if published and claimed is None:
        out.missing.append(published)
    if out.missing or not included or claimed is None:
        return out
    aggregation = spec.aggregation
    values = recompute(included, strategy=aggregation.strategy, params=dict(aggregation.params))
    header = _header(market, spec=spec, task_id=task_id, round_number=round_number + 1)
    out.recomputed = id_hex(model_id(encode(header, values)))
    out.verified = out.recomputed.lower() == published.lower()
    if not out.verified:
        context = context_of(
            claimed, strategy=aggregation.strategy, params=dict(aggregation.params)
        )
        index = first_difference(claimed.values, values) if claimed.header == header else 0
        sent = challenge(context=context, published=claimed, included=included, index=index)
        out.mismatch = {
            "chunk": sent.chunk,
            "offset": sent.offset,
            "challenge": {
                "global_id": sent.global_id,
                "chunk": sent.chunk,
                "offset": sent.offset,
                "included": [dataclasses.asdict(u) for u in sent.included],
            },
        }
    return out


def payments(market: FlexMarket, *, task_id: int) -> dict[str, dict[str, int]]:
    """Wei credited to each account for the task, by reason, from the chain's events."""
    credited: dict[str, dict[str, int]] = {}
    head = market.w3.eth.block_number
    for scanned in market.scan(from_block=market.deploy_block or 0, to_block=head):
        for event in scanned.events:
            if isinstance(event, PaymentCredited) and event.task_id == task_id:
                mine = credited.setdefault(event.account, {})
                reason = event.reason.name.lower()
                mine[reason] = mine.get(reason, 0) + event.amount_wei
    return credited


def provenance(market: FlexMarket, *, task_id: int, spec: dict, blobs: Blobs) -> dict[str, Any]:
    """The task's provenance report (see the module's doc); raises SpecHashMismatchError when
    ``spec`` is not the task's."""
    parsed = TaskSpec.from_dict(spec)
    task = market.task(task_id=task_id)
    if parsed.hash_hex.lower() != task.spec_hash.lower():
        raise SpecHashMismatchError(task_id=task_id, on_chain=task.spec_hash, given=parsed.hash_hex)
    selection = market.selection(task_id=task_id)
    rounds = [_initial(market, spec=parsed, task_id=task_id)]
    published = market.task(task_id=task_id).published_rounds
    for r in range(max(published - 1, 0) if selection else 0):
        rounds.append(
            _round(
                market,
                spec=parsed,
                task_id=task_id,
                round_number=r,
                selection=selection,
                blobs=blobs,
            )
        )
    return {
        "task_id": task_id,
        "chain_id": market.w3.eth.chain_id,
        "contract": market.address,
        "state": task.state.name.lower(),
        "strategy": parsed.aggregation.strategy,
        "aggregator": task.aggregator,
        "verified": all(r.verified for r in rounds),
        "rounds": [dataclasses.asdict(r) for r in rounds],
        "payments": payments(market, task_id=task_id),
    }


def table(report: dict[str, Any]) -> str:
    """The report as the command prints it."""
    lines = [
        f"task {report['task_id']} on chain {report['chain_id']} at {report['contract']}: "
        f"{report['state']}, {report['strategy']}, aggregator {report['aggregator']}",
        f"{'round':>5}  {'global model':<18}  {'from':<24}  verdict",
    ]
    for r in report["rounds"]:
        source = "the spec" if r["made_from"] == "spec" else f"{len(r['updates'])} update(s)"
        if r["left_out"]:
            source += f", {len(r['left_out'])} left out"
        if r["verified"]:
            verdict = "recomputed, equal"
        elif r["missing"]:
            verdict = f"not checked: {len(r['missing'])} blob(s) unavailable"
        elif r["mismatch"]:
            verdict = f"DIFFERS at chunk {r['mismatch']['chunk']}, value {r['mismatch']['offset']}"
        else:
            verdict = "DIFFERS"
        shown = (r["global_model"] or "none")[:18]
        lines.append(f"{r['round']:>5}  {shown:<18}  {source:<24}  {verdict}")
        for u in r["updates"]:
            score = "-" if u["score"] is None else u["score"]
            lines.append(f"         {u['trainer']}  weight {u['weight']}  score {score}")
        if r["mismatch"]:
            sent = r["mismatch"]["challenge"]
            lines.append(
                f"         challenge: FlexVerifier.check of {sent['global_id']} at chunk "
                f"{sent['chunk']}, value {sent['offset']}, opening {len(sent['included'])} "
                "update(s) (in the JSON report)"
            )
    lines.append("credited for the task (wei):")
    for account, reasons in report["payments"].items():
        shown = ", ".join(f"{k} {v}" for k, v in reasons.items())
        lines.append(f"  {account}  {sum(reasons.values())}  ({shown})")
    lines.append("verified" if report["verified"] else "NOT verified")
    return "\n".join(lines)
