"""Measure FlexMarket's gas per call on a fresh local chain; write var/bench/gas.json."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from web3 import Web3

from bench import verdict
from bench.batch import Call, transact_many
from chain.build import BUILD, load_artifact
from chain.client import FlexMarket
from chain.events import DeviceClass, Role, TaskCreated
from chain.launcher import LocalChain, dev_accounts
from chain.selection import mask_of

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "var" / "bench" / "gas.json"

TARGETS = {
    "submitUpdate": 80_000,
    "publishGlobalModel": 130_000,
    "selectNodes500": 15_000_000,
    # EIP-7825's per-transaction gas cap: the caps' worst cases must fit one transaction.
    "worstCase": 2**24,
    # EIP-170: the most deployed code a contract may have.
    "codeSize": 24_576,
}
MIN_TRAINER_PRICE_WEI = 10**9
MIN_AGGREGATOR_PRICE_WEI = 2 * 10**9
ROUND_TIMEOUT = 3600
SELECTION_SIZES = {10: 10, 100: 50, 500: 50}  # bids -> maxTrainers
ROUND_TRAINERS = 10
MODEL_SIZES = {"10kB": 10_000, "100MB": 100_000_000}
# Gas limit of a batched submitUpdate (it uses under 80,000), so a block takes a whole round.
SUBMIT_GAS = 150_000


@dataclass
class Bench:
    w3: Web3
    market: FlexMarket
    owner: LocalAccount
    buyer: LocalAccount
    rng: random.Random

    def now(self) -> int:
        return self.w3.eth.get_block("latest")["timestamp"]

    def advance(self, seconds: int) -> None:
        self.w3.provider.make_request("evm_increaseTime", [seconds])
        self.w3.provider.make_request("evm_mine", [])


def device_accounts(n: int, *, tag: str) -> list[LocalAccount]:
    """Deterministic throwaway device keys (deriving hundreds from the mnemonic is slow)."""
    return [Account.from_key(keccak(text=f"flex-bench-{tag}-{i}")) for i in range(n)]


def enrol(bench: Bench, devices: Sequence[LocalAccount], *, can_aggregate: bool) -> None:
    for device in devices:
        bench.w3.provider.make_request("anvil_setBalance", [device.address, hex(10**20)])
    registrations = [
        Call(
            bench.owner.address,
            "registerDevice",
            (device.address, int(DeviceClass.GPU), can_aggregate),
        )
        for device in devices
    ]
    transact_many(bench.market, registrations)


def create_task(bench: Bench, *, rounds: int, max_trainers: int) -> tuple[int, int]:
    budget = rounds * (max_trainers * 10 * MIN_TRAINER_PRICE_WEI + 10 * MIN_AGGREGATOR_PRICE_WEI)
    result = bench.market.create_task(
        sender=bench.buyer,
        spec_hash=keccak(text=f"spec-{bench.rng.random()}"),
        rounds=rounds,
        min_trainers=1,
        max_trainers=max_trainers,
        bidding_ends=bench.now() + 10_000,
        round_timeout=ROUND_TIMEOUT,
        budget_wei=budget,
    )
    return result.first(TaskCreated).task_id, result.gas_used


def place_bids(
    bench: Bench, task_id: int, aggregator: LocalAccount, trainers: Sequence[LocalAccount]
) -> list[int]:
    """Bids from one aggregator and every trainer (random prices and samples), mined
    together; each bid's gas, the aggregator's first."""
    info = bench.market.task(task_id=task_id)
    bids = [
        Call(
            aggregator.address,
            "placeBid",
            (task_id, MIN_AGGREGATOR_PRICE_WEI, 0, int(Role.AGGREGATOR)),
            value_wei=info.deposit_wei(Role.AGGREGATOR),
        )
    ]
    for trainer in trainers:
        price = MIN_TRAINER_PRICE_WEI * bench.rng.randint(1, 10)
        samples = bench.rng.randint(100, 10_000)
        bids.append(
            Call(
                trainer.address,
                "placeBid",
                (task_id, price, samples, int(Role.TRAINER)),
                value_wei=info.deposit_wei(Role.TRAINER),
            )
        )
    return transact_many(bench.market, bids)


def measure_deposits(
    bench: Bench, aggregator: LocalAccount, devices: Sequence[LocalAccount]
) -> dict[str, int]:
    """What stakes and bonds cost: a trainer bid paying its stake, an aggregator bid paying
    its bond, a bid withdrawn while bidding, and an unselected bid's stake released."""
    task_id, _ = create_task(bench, rounds=5, max_trainers=1)
    bond = bench.market.place_bid(
        sender=aggregator,
        task_id=task_id,
        price_per_round_wei=MIN_AGGREGATOR_PRICE_WEI,
        samples=0,
        role=Role.AGGREGATOR,
    ).gas_used
    stake = [
        bench.market.place_bid(
            sender=d,
            task_id=task_id,
            price_per_round_wei=MIN_TRAINER_PRICE_WEI,
            samples=100 + i,
            role=Role.TRAINER,
        ).gas_used
        for i, d in enumerate(devices[:4])
    ]
    withdraw_bid = bench.market.withdraw_bid(sender=devices[0], task_id=task_id).gas_used
    bench.advance(10_001)
    bench.market.select_nodes(sender=bench.owner, task_id=task_id)
    selected = bench.market.selection(task_id=task_id)
    assert selected is not None
    loser = next(d for d in devices[1:4] if d.address not in selected.trainers)
    release = bench.market.withdraw_bid(
        sender=bench.owner, task_id=task_id, device=loser.address
    ).gas_used
    return {
        "placeBidWithBond": bond,
        "placeBidWithStake": int(statistics.median(stake)),
        "withdrawBidWhileBidding": withdraw_bid,
        "withdrawBidUnselected": release,
    }


def code_sizes(w3: Web3, market: FlexMarket) -> dict[str, int]:
    """Deployed code size in bytes of every compiled contract (FlexMarket's read from the
    chain, the others from their artefacts)."""
    sizes = {}
    for path in sorted(BUILD.glob("*.json")):
        artefact = load_artifact(path.stem) if path.stem != "build-info" else {}
        code = bytes.fromhex((artefact.get("deployedBytecode") or "").removeprefix("0x"))
        if code:  # an interface has none
            sizes[path.stem] = len(code)
    sizes["FlexMarket"] = len(w3.eth.get_code(market.address))
    return sizes


def measure_selection(
    bench: Bench, aggregator: LocalAccount, devices: Sequence[LocalAccount]
) -> dict[str, int]:
    """selectNodes gas with N bids in total: one aggregator bid and N-1 trainer bids."""
    out = {}
    for bids, max_trainers in SELECTION_SIZES.items():
        task_id, _ = create_task(bench, rounds=5, max_trainers=max_trainers)
        place_bids(bench, task_id, aggregator, devices[: bids - 1])
        bench.advance(10_001)
        result = bench.market.select_nodes(sender=bench.owner, task_id=task_id)
        out[str(bids)] = result.gas_used
    return out


def model_id(blob: bytearray, salt: int) -> bytes:
    """keccak of the blob with its first 8 bytes set to ``salt``: a distinct real model."""
    blob[:8] = salt.to_bytes(8, "big")
    return keccak(bytes(blob))


def measure_rounds(
    bench: Bench, aggregator: LocalAccount, trainers: Sequence[LocalAccount]
) -> dict[str, Any]:
    """submitUpdate / publishGlobalModel with 10 trainers for 10 kB and 100 MB models,
    then finalize and withdraw of that task."""
    task_id, _ = create_task(bench, rounds=len(MODEL_SIZES) + 1, max_trainers=ROUND_TRAINERS)
    place_bids(bench, task_id, aggregator, trainers)
    bench.advance(10_001)
    bench.market.select_nodes(sender=bench.owner, task_id=task_id)
    selection = bench.market.selection(task_id=task_id)
    assert selection is not None
    assert len(selection.trainers) == ROUND_TRAINERS
    by_address = {t.address: t for t in trainers}
    positioned = [by_address[a] for a in selection.trainers]
    everyone = mask_of(range(ROUND_TRAINERS))

    blobs = {name: bytearray(bench.rng.randbytes(size)) for name, size in MODEL_SIZES.items()}
    bench.market.publish_global_model(
        sender=aggregator,
        task_id=task_id,
        round_number=0,
        model_id=model_id(blobs["10kB"], 0),
    )
    submit: dict[str, dict[str, int]] = {}
    publish: dict[str, dict[str, int]] = {}
    for round_number, (name, blob) in enumerate(blobs.items()):
        gas = []
        for position, trainer in enumerate(positioned):
            update = model_id(blob, 1000 * round_number + position + 1)
            result = bench.market.submit_update(
                sender=trainer, task_id=task_id, round_number=round_number, model_id=update
            )
            gas.append(result.gas_used)
        submit[name] = {"first": gas[0], "max": max(gas), "median": int(statistics.median(gas))}
        scores = [bench.rng.randint(1, 1000) for _ in range(ROUND_TRAINERS)]
        result = bench.market.publish_global_model(
            sender=aggregator,
            task_id=task_id,
            round_number=round_number + 1,
            model_id=model_id(blob, 999_999 + round_number),
            aggregated_mask=everyone,
            scores=scores,
        )
        publish[name] = {"scored": result.gas_used}

    # Last round unscored, to show both paths, then settle and withdraw.
    last = len(blobs)
    for position, trainer in enumerate(positioned):
        bench.market.submit_update(
            sender=trainer,
            task_id=task_id,
            round_number=last,
            model_id=keccak(text=f"last-{position}"),
        )
    unscored = bench.market.publish_global_model(
        sender=aggregator,
        task_id=task_id,
        round_number=last + 1,
        model_id=keccak(text="final"),
        aggregated_mask=everyone,
    ).gas_used
    finalize = bench.market.finalize(sender=bench.owner, task_id=task_id).gas_used
    withdraw = bench.market.withdraw(sender=positioned[0]).gas_used
    return {
        "submit": submit,
        "publish": publish,
        "publishUnscored": unscored,
        "finalize": finalize,
        "withdraw": withdraw,
    }


def measure_worst(bench: Bench) -> dict[str, Any]:
    """The caps' worst cases: selectNodes with MAX_BIDS bids selecting MAX_TRAINERS, and
    finalize of MAX_ROUNDS rounds x MAX_TRAINERS trainers, every round scored. Its devices
    are new, so that finalize credits every account for the first time (the dearest write)."""
    limits = bench.market.limits()
    aggregator = device_accounts(1, tag="worst-aggregator")[0]
    devices = device_accounts(limits.max_bids - 1, tag="worst")
    enrol(bench, [aggregator], can_aggregate=True)
    enrol(bench, devices, can_aggregate=False)
    task_id, _ = create_task(bench, rounds=limits.max_rounds, max_trainers=limits.max_trainers)
    place_bids(bench, task_id, aggregator, devices)
    bench.advance(10_001)
    select = bench.market.select_nodes(sender=bench.owner, task_id=task_id).gas_used
    selection = bench.market.selection(task_id=task_id)
    assert selection is not None
    assert len(selection.trainers) == limits.max_trainers
    by_address = {d.address: d for d in devices}
    trainers = [by_address[a] for a in selection.trainers]
    everyone = mask_of(range(len(trainers)))
    # The last score dwarfs the others: its share is capped at its price, so every round
    # takes settlement's dearest path (the held-back rest shared out by headroom).
    scores = [1 + i for i in range(len(trainers) - 1)] + [2**16 - 1]
    pool = sum(selection.trainer_prices_wei) // 2
    capped = any(
        pool * score // sum(scores) > price
        for score, price in zip(scores, selection.trainer_prices_wei, strict=True)
    )
    for round_number in range(limits.max_rounds + 1):
        if round_number:
            bench.market.publish_global_model(
                sender=aggregator,
                task_id=task_id,
                round_number=round_number,
                model_id=keccak(text=f"worst-global-{round_number}"),
                aggregated_mask=everyone,
                scores=scores,
            )
        else:
            bench.market.publish_global_model(
                sender=aggregator, task_id=task_id, round_number=0, model_id=keccak(text="w0")
            )
        if round_number == limits.max_rounds:
            break
        updates = [
            Call(
                trainer.address,
                "submitUpdate",
                (task_id, round_number, keccak(text=f"worst-{round_number}-{position}")),
                gas=SUBMIT_GAS,
            )
            for position, trainer in enumerate(trainers)
        ]
        transact_many(bench.market, updates)
    # The measured call: a normal signed transaction, mined alone, gasUsed from its receipt.
    finalize = bench.market.finalize(sender=bench.owner, task_id=task_id).gas_used
    return {
        "selectNodes": select,
        "finalize": finalize,
        "bids": limits.max_bids,
        "trainers": limits.max_trainers,
        "rounds": limits.max_rounds,
        "capped": capped,
    }


def run(*, seed: int = 7, worst: bool = False) -> dict[str, Any]:
    started = time.monotonic()
    with LocalChain(accounts=2) as node:
        w3 = node.w3()
        owner, buyer = dev_accounts(2)
        market = FlexMarket.deploy(
            w3=w3,
            sender=owner,
            min_trainer_price_wei=MIN_TRAINER_PRICE_WEI,
            min_aggregator_price_wei=MIN_AGGREGATOR_PRICE_WEI,
        )
        bench = Bench(w3=w3, market=market, owner=owner, buyer=buyer, rng=random.Random(seed))
        aggregator = device_accounts(1, tag="aggregator")[0]
        devices = device_accounts(max(SELECTION_SIZES), tag="device")
        enrol(bench, [aggregator], can_aggregate=True)
        enrol(bench, devices, can_aggregate=False)

        create_gas = create_task(bench, rounds=5, max_trainers=10)[1]
        bid_task, _ = create_task(bench, rounds=5, max_trainers=10)
        bid_gas = place_bids(bench, bid_task, aggregator, devices[:10])
        deposits = measure_deposits(bench, aggregator, devices[10:14])
        selection = measure_selection(bench, aggregator, devices)
        sizes = code_sizes(w3, market)
        rounds = measure_rounds(bench, aggregator, devices[:ROUND_TRAINERS])
        worst_case = measure_worst(bench) if worst else None

    results: dict[str, Any] = {
        "createTask": create_gas,
        "placeBid": int(statistics.median(bid_gas[1:])),
        "deposits": deposits,
        "selectNodes": selection,
        # The worst case: the first update of a round also starts the round's bitmask slot.
        "submitUpdate": {name: g["max"] for name, g in rounds["submit"].items()},
        # With a score per trainer, the dearer of the two publishing paths.
        "publishGlobalModel": {name: g["scored"] for name, g in rounds["publish"].items()},
        "finalize": rounds["finalize"],
        "withdraw": rounds["withdraw"],
        "details": {
            "submitUpdateMedian": {n: g["median"] for n, g in rounds["submit"].items()},
            "publishGlobalModelUnscored": rounds["publishUnscored"],
            "finalizeTask": {"rounds": len(MODEL_SIZES) + 1, "trainers": ROUND_TRAINERS},
            "selectNodesMaxTrainers": {str(k): v for k, v in SELECTION_SIZES.items()},
            "seconds": round(time.monotonic() - started, 1),
        },
        "codeSize": sizes,
        "targets": TARGETS,
    }
    if worst_case is not None:
        results["worstCase"] = worst_case
    results["pass"] = {
        "submitUpdate": max(results["submitUpdate"].values()) < TARGETS["submitUpdate"],
        "publishGlobalModel": max(results["publishGlobalModel"].values())
        < TARGETS["publishGlobalModel"],
        "selectNodes500": selection["500"] < TARGETS["selectNodes500"],
        "codeSize": max(sizes.values()) < TARGETS["codeSize"],
    }
    if worst_case is not None:
        worst_gas = max(worst_case["selectNodes"], worst_case["finalize"])
        results["pass"]["worstCase"] = worst_gas < TARGETS["worstCase"]
    return results


def table(results: dict[str, Any]) -> str:
    rows = [("createTask", results["createTask"]), ("placeBid", results["placeBid"])]
    rows += list(results["deposits"].items())
    rows += [(f"selectNodes {n} bids", g) for n, g in results["selectNodes"].items()]
    rows += [(f"submitUpdate {n}", g) for n, g in results["submitUpdate"].items()]
    rows += [(f"publishGlobalModel {n}", g) for n, g in results["publishGlobalModel"].items()]
    rows += [
        ("publishGlobalModel unscored", results["details"]["publishGlobalModelUnscored"]),
        ("finalize", results["finalize"]),
        ("withdraw", results["withdraw"]),
    ]
    if "worstCase" in results:
        w = results["worstCase"]
        rows += [
            (f"selectNodes {w['bids']} bids, {w['trainers']} trainers", w["selectNodes"]),
            (f"finalize {w['rounds']} rounds x {w['trainers']} trainers", w["finalize"]),
        ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'call':<{width}}  {'gas':>11}", f"{'-' * width}  {'-' * 11}"]
    lines += [f"{name:<{width}}  {gas:>11,}" for name, gas in rows]
    lines += [""] + [
        f"{f'{name} deployed code':<{width}}  {size:>11,} bytes"
        for name, size in results["codeSize"].items()
    ]
    for target, ok in results["pass"].items():
        lines.append(f"target {target} < {TARGETS[target]:,}: {'pass' if ok else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gas", description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--worst",
        action="store_true",
        help="also measure the caps' worst cases (about 15,000 transactions, mostly batched)",
    )
    args = parser.parse_args(argv)
    results = run(seed=args.seed, worst=args.worst)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {args.out} in {results['details']['seconds']}s")
    return verdict(all(results["pass"].values()))


if __name__ == "__main__":
    sys.exit(main())
