"""`python -m bench verify`: what checking an aggregator costs.

Gas of one successful challenge (a wrong FedAvg value shown by FlexVerifier) at 10, 50 and
128 trainers for models of 10 k, 1 M and 10 M parameters: a challenge opens one chunk of
each model, so calldata grows with the trainers and the Merkle path with the log of the
model size. Each model's other chunks are stand-ins (their leaf hashes enter only through
the path), so no 10 M-parameter model has to be built 129 times.

Then the time to recompute a round from its blobs (check every update against its ID,
aggregate, encode, compare the ID) against the time the aggregator's own arithmetic took.

And what a watcher's check of a round costs (dataplane.audit.check_round): one request for
64 sampled chunks of each of 32 updates of a million values, as the aggregator's data plane
answers it from its store (training.serialize.Openings): the answer's bytes, the
aggregator's CPU for the first request (each update's Merkle tree made and checked) and for
the next ones (the trees kept), and the watcher's CPU to check the answer against the IDs.
Writes var/bench/verify.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import verdict
from chain.fraud import Challenge, FlexVerifier, Included, RoundContext, Strategy
from chain.launcher import LocalChain, dev_accounts
from dataplane.audit import WATCH_CHUNKS, sample_chunks
from training import merkle
from training.aggregation import FedAvg, Update
from training.serialize import (
    CHUNK_VALUES,
    ChunkOpening,
    Header,
    Kind,
    Openings,
    decode,
    encode,
    id_hex,
    id_of,
)
from training.store import ModelStore

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "var" / "bench" / "verify.json"
TRAINERS = (10, 50, 128)
PARAMETERS = (10_000, 1_000_000, 10_000_000)
TARGET_GAS = 3_000_000  # one challenge at 10 trainers x 10 M parameters
MARKET = "0x" + "c0" * 20
CHAIN_ID, TASK, ROUND = 31337, 1, 3
RECOMPUTE = ((10, 10_000), (10, 1_000_000))


def _trainer(k: int) -> str:
    """The address of the benched round's trainer number ``k``."""
    return "0x" + (k + 1).to_bytes(20, "big").hex()


def _update_header(k: int, parameters: int) -> Header:
    """The header of trainer number ``k``'s update of the benched round."""
    return Header(
        kind=Kind.UPDATE,
        chain_id=CHAIN_ID,
        contract=MARKET,
        task_id=TASK,
        round_number=ROUND,
        shapes=((parameters,),),
        trainer=_trainer(k),
    )


def _opening(header: Header, values: np.ndarray, siblings: list[bytes]) -> tuple[ChunkOpening, str]:
    """Chunk 0 of a model whose other chunks sit behind ``siblings``, and the model's ID."""
    raw = values.astype(">i4").tobytes()
    h = merkle.leaf(raw)
    for sibling in siblings:
        h = merkle.node(h, sibling)
    packed = header.pack()
    opened = ChunkOpening(index=0, header=packed, root=h, values=raw, siblings=tuple(siblings))
    return opened, id_hex(id_of(packed, h))


def challenge_of(trainers: int, parameters: int, rng: np.random.Generator) -> Challenge:
    """A challenge of value 0 of a global model whose chunk 0 is off by one."""
    chunks = -(-parameters // CHUNK_VALUES)
    leaves = [bytes(32)] + [merkle.leaf(rng.bytes(4 * CHUNK_VALUES))] * (chunks - 1)
    siblings = merkle.proof(leaves, 0)
    included, openings, values = [], [], []
    for k in range(trainers):
        trainer = _trainer(k)
        chunk = rng.integers(-(2**20), 2**20, size=CHUNK_VALUES, dtype=np.int32)
        opening, model_id = _opening(_update_header(k, parameters), chunk, siblings)
        weight = int(rng.integers(1, 1000))
        included.append(Included(model_id=model_id, trainer=trainer, weight=weight))
        openings.append(opening)
        values.append((chunk, weight))
    total = sum(w for _, w in values)
    honest = np.floor_divide(sum(c.astype(np.int64) * w for c, w in values), total)
    honest[0] += 1
    header = Header(
        kind=Kind.GLOBAL,
        chain_id=CHAIN_ID,
        contract=MARKET,
        task_id=TASK,
        round_number=ROUND + 1,
        shapes=((parameters,),),
    )
    global_opening, global_id = _opening(header, honest, siblings)
    return Challenge(
        context=RoundContext(CHAIN_ID, MARKET, TASK, ROUND, Strategy.FED_AVG),
        global_id=global_id,
        included=tuple(included),
        chunk=0,
        offset=0,
        global_opening=global_opening,
        updates=tuple(openings),
    )


def measure_gas(rng: np.random.Generator) -> dict[str, dict[str, int]]:
    with LocalChain(accounts=1) as node:
        w3 = node.w3()
        (sender,) = dev_accounts(1)
        verifier = FlexVerifier.deploy(w3=w3, sender=sender)
        gas: dict[str, dict[str, int]] = {}
        for trainers in TRAINERS:
            for parameters in PARAMETERS:
                sent = challenge_of(trainers, parameters, rng)
                assert verifier.check(sent).fraud, "the bench's wrong value was not shown"
                gas.setdefault(str(trainers), {})[str(parameters)] = verifier.gas(
                    sent, sender=sender.address
                )
        return gas


def _random_update(rng: np.random.Generator, *, trainer: int, parameters: int) -> bytes:
    """The blob of trainer number ``trainer``'s update of the benched round: random values."""
    values = [rng.integers(-(2**20), 2**20, size=parameters, dtype=np.int32)]
    return encode(_update_header(trainer, parameters), values)


def measure_recompute(rng: np.random.Generator) -> list[dict[str, Any]]:
    """Aggregating a round as the aggregator does, against recomputing it from its blobs."""
    rows = []
    for trainers, parameters in RECOMPUTE:
        blobs, counts = [], []
        for k in range(trainers):
            blobs.append(_random_update(rng, trainer=k, parameters=parameters))
            counts.append(int(rng.integers(1, 1000)))
        ids = [decode(b).model_id for b in blobs]
        global_header = Header(
            kind=Kind.GLOBAL,
            chain_id=CHAIN_ID,
            contract=MARKET,
            task_id=TASK,
            round_number=ROUND + 1,
            shapes=((parameters,),),
        )
        updates = [Update(decode(b).values, n) for b, n in zip(blobs, counts, strict=True)]
        started = time.perf_counter()
        published = encode(global_header, FedAvg().aggregate(updates))
        aggregate_s = time.perf_counter() - started
        published_id = decode(published).model_id

        started = time.perf_counter()
        checked = [
            Update(decode(b, expected_id=i).values, n)
            for b, i, n in zip(blobs, ids, counts, strict=True)
        ]
        again = decode(encode(global_header, FedAvg().aggregate(checked))).model_id
        recompute_s = time.perf_counter() - started
        assert again == published_id, "the recomputed round differs from the published one"
        rows.append(
            {
                "trainers": trainers,
                "parameters": parameters,
                "aggregate_s": round(aggregate_s, 4),
                "recompute_s": round(recompute_s, 4),
                "ratio": round(recompute_s / aggregate_s, 2),
            }
        )
    return rows


WATCH_UPDATES, WATCH_PARAMETERS = 32, 1_000_000


def measure_watch(rng: np.random.Generator) -> dict[str, Any]:
    """A watcher's request for 64 sampled chunks of each of a round's updates, served from a
    store and checked, as CPU seconds (this process does nothing else meanwhile)."""
    with tempfile.TemporaryDirectory() as root:
        store = ModelStore(root)
        ids = []
        for k in range(WATCH_UPDATES):
            ids.append(store.put(_random_update(rng, trainer=k, parameters=WATCH_PARAMETERS)))
        chunks = sample_chunks(
            -(-WATCH_PARAMETERS // CHUNK_VALUES),
            limit=WATCH_CHUNKS,
            rng=random.Random(int(rng.integers(1 << 31))),
        )

        def serve() -> tuple[bytes, float]:
            started = time.process_time()
            answer = b"".join(store.opened(i, chunks).pack() for i in ids)
            return answer, time.process_time() - started

        answer, first_s = serve()
        _, kept_s = serve()
        started = time.process_time()
        offset = 0
        for model_id in ids:
            opened, offset = Openings.unpack(answer, offset, chunks)
            opened.check(model_id)
        check_s = time.process_time() - started
    return {
        "updates": WATCH_UPDATES,
        "parameters": WATCH_PARAMETERS,
        "chunks": len(chunks),
        "answer_bytes": len(answer),
        "serve_first_s": round(first_s, 4),
        "serve_kept_s": round(kept_s, 4),
        "check_s": round(check_s, 4),
    }


def run(seed: int = 7) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    started = time.monotonic()
    gas = measure_gas(rng)
    recompute = measure_recompute(rng)
    watch = measure_watch(rng)
    worst = gas[str(TRAINERS[0])][str(PARAMETERS[-1])]
    return {
        "challengeGas": gas,
        "recompute": recompute,
        "watch": watch,
        "targets": {"challenge10x10M": TARGET_GAS},
        "pass": {"challenge10x10M": worst < TARGET_GAS},
        "seconds": round(time.monotonic() - started, 1),
    }


def table(results: dict[str, Any]) -> str:
    lines = ["gas of one challenge (a wrong FedAvg value shown)"]
    lines.append(f"{'trainers':>8}  " + "  ".join(f"{p:>12,}" for p in PARAMETERS))
    for trainers, row in results["challengeGas"].items():
        lines.append(f"{trainers:>8}  " + "  ".join(f"{g:>12,}" for g in row.values()))
    lines.append("recompute a round from its blobs vs the aggregator's arithmetic")
    for r in results["recompute"]:
        lines.append(
            f"  {r['trainers']} x {r['parameters']:,}: aggregate {r['aggregate_s']:.3f} s, "
            f"recompute {r['recompute_s']:.3f} s ({r['ratio']}x)"
        )
    w = results["watch"]
    lines.append(
        f"a watcher's request, {w['chunks']} chunks of each of {w['updates']} updates of "
        f"{w['parameters']:,} values: {w['answer_bytes']:,} bytes; the aggregator's CPU "
        f"{w['serve_first_s']:.3f} s the first time, {w['serve_kept_s']:.3f} s after; "
        f"the watcher's check {w['check_s']:.3f} s"
    )
    ok = results["pass"]["challenge10x10M"]
    lines.append(f"target 10 trainers x 10 M < {TARGET_GAS:,}: {'pass' if ok else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.verify", description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    results = run(seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {args.out} in {results['seconds']}s")
    return verdict(all(results["pass"].values()))


if __name__ == "__main__":
    sys.exit(main())
