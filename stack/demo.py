"""`make demo`: the local stack, headless, runs one task end to end, then everyone withdraws.

The demo buyer posts a task, devices bid, the contract selects, the rounds run, the task is
settled and the model downloaded and checked against its on-chain ID, and every global model
recomputed by `python -m worker provenance` from the chain and the aggregator's blobs; then
every device with a credit withdraws it through its own CLI and the buyer through the
website's service, and var/demo/summary.json records each credit back at zero and each
account up by its credit less the gas it paid.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import median

from chain.events import (
    GlobalModelPublished,
    UpdateSubmitted,
    decode_logs,
    event_topics,
)
from chain.follow import Doorbell
from chain.node import client
from stack.devstack import LOCAL_DEVICES, PY, _config, say, stack
from training.spec import TaskSpec

DEMO_SPEC = {
    "model": "digits-mlp",
    "dataset": "digits-8x8",
    "local_epochs": 5,
    "batch_size": 32,
    "learning_rate": 0.2,
    "seed": 1,
}
TERMINAL = {"finalized", "aborted", "failed", "cancelled"}
# Devices load their data and libraries before they take work and bid within about a second
# of the notice; the window leaves a wide margin over that (chain sync, the notice and the bid
# all slow down on a busy machine), so that a slow machine delays the demo, never fails it.
BIDDING_WINDOW_S = 30
# Each global model may be proven wrong for this long after it is published; the local stack
# keeps it short (a trainer checks a model right after training from it) so a task settles soon
# after its last round. A buyer's task defaults to its round timeout (services.task_create).
DISPUTE_WINDOW_S = 60


class RoundClock:
    """When each global model of task ``task_id`` was mined (``published``: round -> time)
    and each update (``submitted``: round -> times), on this process's monotonic clock: a
    doorbell on the task's GlobalModelPublished and UpdateSubmitted logs reads each as the
    node pushes it. The platform's mirror commits a burst of blocks at once, so two short
    rounds timed by when it shows them could read as one round and one of no time.
    ``on_round`` is called with each published round's number from 1 on, as it is seen, in
    order, from the doorbell's thread."""

    def __init__(
        self,
        *,
        rpc_url: str,
        address: str,
        task_id: int,
        from_block: int,
        on_round: Callable[[int], None] | None = None,
    ) -> None:
        self.published: dict[int, float] = {}
        self.submitted: dict[int, list[float]] = {}
        self.on_round = on_round
        self._w3 = client(rpc_url)
        self._address = address
        names = event_topics()
        topics = [[names["GlobalModelPublished"], names["UpdateSubmitted"]], f"0x{task_id:064x}"]
        self._next = from_block
        self.bell = Doorbell(
            url=rpc_url,
            ring=self._look,
            logs={"address": address, "topics": topics},
            idle_s=1.0,
            name="flex-round-clock",
        )

    def _look(self) -> None:
        seen = time.monotonic()  # the push's time, before this look's own requests
        after, logs = self.bell.new_logs(self._w3, from_block=self._next)
        for event in decode_logs(logs, address=self._address):
            if isinstance(event, UpdateSubmitted):
                self.submitted.setdefault(event.round, []).append(seen)
            elif isinstance(event, GlobalModelPublished) and event.round not in self.published:
                self.published[event.round] = seen
                if self.on_round is not None and event.round >= 1:
                    self.on_round(event.round)
        self._next = after

    def phases(self, number: int) -> dict[str, float] | None:
        """Round ``number``'s updates (trained from global model ``number``) as seconds after
        that model was mined: the first and the last; None where the clock lacks either."""
        out, updates = self.published.get(number), self.submitted.get(number)
        if out is None or not updates:
            return None
        return {
            "first_update_s": round(min(updates) - out, 3),
            "last_update_s": round(max(updates) - out, 3),
        }

    def __enter__(self) -> RoundClock:
        self.bell.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bell.stop()


def round_phases(rounds: Sequence[dict]) -> dict[str, float]:
    """Where the time of ``rounds`` (follow_task's, steady ones) goes, as medians: from a
    global model to the first and the last update trained from it being mined, and from
    that to the next model (the aggregation and its publication). Empty when the round
    clock timed none of them."""
    timed = [(r["updates_mined_s"], r["wall_s"]) for r in rounds if r.get("updates_mined_s")]
    if not timed:
        return {}
    return {
        "model_to_first_update_s": median(u["first_update_s"] for u, _ in timed),
        "model_to_last_update_s": median(u["last_update_s"] for u, _ in timed),
        "last_update_to_next_model_s": median(wall - u["last_update_s"] for u, wall in timed),
    }


def _progress_bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // max(total, 1)
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def follow_task(
    up: dict,
    *,
    out: Path,
    spec_fields: dict,
    trainers: int,
    budget_wei: int,
    round_timeout_s: int,
    kill_in_round: int | None = None,
    timeout_s: float = 600,
    bidding_window_s: int = BIDDING_WINDOW_S,
    dispute_window_s: int = DISPUTE_WINDOW_S,
    on_round: Callable[[int], None] | None = None,
) -> dict:
    """Post a task as the demo buyer on a running stack and follow it to a downloaded,
    verified model; returns the summary (also written to ``out``/summary.json).
    ``on_round`` is called with each published round's number as the mirror first shows it.

    ``kill_in_round``: right after one selected trainer submits its update for the round
    before (1-based rounds), its worker process is killed, so it misses that round; the
    round closes at its timeout with the updates that arrived.
    """
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update({k: v for k, v in up["env"].items() if k != "PYTHONUNBUFFERED"})
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from marketplace import contract, services
    from marketplace.models import Bid, Payout, PayoutReason, Round, Task, Update
    from marketplace.models_download import final_model_fetch
    from marketplace.selectors import TaskView
    from marketplace.wallets import wallet_account, wallet_of
    from training.serialize import id_hex, model_id
    from training.store import ModelStore
    from worker.node import STORE_DIR

    buyer = get_user_model().objects.get(username=up["buyer"]["username"])
    spec = TaskSpec.from_dict(spec_fields)
    rounds = spec.rounds
    started = time.monotonic()
    order = services.task_create(
        buyer=buyer,
        title=f"{spec.model}, {trainers} trainers x {rounds} rounds",
        spec=spec,
        budget_wei=budget_wei,
        min_trainers=trainers,
        max_trainers=trainers,
        bidding_window_s=bidding_window_s,
        round_timeout_s=round_timeout_s,
        dispute_window_s=dispute_window_s,
    )
    say(f"task {order.chain_task_id} posted: budget {budget_wei} wei, tx {order.created_tx}")
    say(
        f"bidding is open for {bidding_window_s} s: devices bid within about a second, the "
        "rest is margin for a busy machine"
    )
    say(
        f"each global model may be challenged for {dispute_window_s} s after it is published; "
        "the task settles once the last model's window has closed"
    )
    w3 = contract.w3()
    clock = RoundClock(
        rpc_url=settings.ETH_RPC_URL,
        address=contract.address(),
        task_id=order.chain_task_id,
        from_block=w3.eth.get_transaction_receipt(order.created_tx)["blockNumber"],
        on_round=on_round,
    )
    with clock:
        # The platform's chain sync mirrors the task from its TaskCreated event.
        while (task := Task.objects.filter(created_tx=order.created_tx).first()) is None:
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"task {order.chain_task_id} was never mirrored by chain sync")
            time.sleep(0.1)
        names = {_config(h)["address"].lower(): n for n, h in up["homes"].items()}
        aggregator_name = next(n for n, h in up["homes"].items() if _config(h)["may_aggregate"])
        aggregator_store = ModelStore(up["homes"][aggregator_name] / STORE_DIR)
        killed = None
        last = None
        while time.monotonic() - started < timeout_s:
            task.refresh_from_db()
            done = _progress_bar(sum(r >= 1 for r in clock.published), rounds)
            line = f"task {task.chain_task_id} {task.state:<9} rounds {done}"
            if line != last:
                print(line, flush=True)
                last = line
            if kill_in_round and killed is None and task.state == "running":
                # The first trainer to deliver the round before, once the aggregator holds its
                # update: it is paid for that round and vanishes before it can train the next.
                before = Update.objects.filter(task=task, round_number=kill_in_round - 2)
                victim = before.order_by("block_number", "id").first()
                if victim is not None and aggregator_store.has(victim.model_id):
                    killed = victim.trainer
                    name = names[killed.lower()]
                    say(f"killing device {name} ({killed}) before round {kill_in_round}")
                    up["supervisor"].stop(name, timeout=1)
            if task.state in TERMINAL:
                break
            time.sleep(0.1)
    task.refresh_from_db()
    # Reports of what each round and update measured travel apart from the chain and may
    # land just after the task settles: give them a moment.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (
        Round.objects.filter(task=task, number__gte=1, report__isnull=True).exists()
        or Update.objects.filter(task=task, report__isnull=True).exists()
    ):
        time.sleep(0.2)
    rows = []
    previous = started
    for r in Round.objects.filter(task=task, number__gte=1).order_by("number"):
        txs = [u.tx_hash for u in Update.objects.filter(task=task, round_number=r.number - 1)]
        gas = sum(w3.eth.get_transaction_receipt(t)["gasUsed"] for t in [*txs, r.tx_hash])
        at = clock.published.get(r.number, time.monotonic())
        rows.append(
            {
                "round": r.number,
                "accuracy": r.metrics.accuracy if r.metrics else None,
                "loss": r.metrics.loss if r.metrics else None,
                "updates": r.updates_aggregated,
                "gas": gas,
                "wall_s": round(at - previous, 3),
                # This model's updates, after the model they were trained from was mined.
                "updates_mined_s": clock.phases(r.number - 1),
            }
        )
        previous = at
    # Pay for work, the refund, and the deposits: stakes and the bond returned, or slashed
    # (credited to the buyer and, when the aggregator is late, the trainers).
    payouts: dict[str, int] = {}
    returned: dict[str, int] = {}
    slashed: dict[str, int] = {}
    refund = 0
    for p in Payout.objects.filter(task=task):
        if p.reason == PayoutReason.REFUND:
            refund += p.amount_wei
        else:
            into = {PayoutReason.STAKE_RETURNED: returned, PayoutReason.STAKE_SLASHED: slashed}
            kind = into.get(p.reason, payouts)
            kind[p.account] = kind.get(p.account, 0) + p.amount_wei
    deposits = {b.device: b.deposit_wei for b in Bid.objects.filter(task=task) if b.deposit_wei}
    # Each trainer's score per round (None: left out) and its pay, as the chain recorded them.
    contributions = {
        c["trainer"]: {
            "name": names.get(c["trainer"].lower(), "?"),
            "position": c["position"],
            "price_wei": str(c["price_per_round_wei"]),
            "scores": [r["score"] if r["aggregated"] else None for r in c["rounds"]],
            "aggregated": [r["aggregated"] for r in c["rounds"]],
            "paid_wei": str(payouts.get(c["trainer"], 0)),
        }
        for c in TaskView(task=task, order=None).contributions
    }
    summary = {
        "task_id": task.chain_task_id,
        # As the chain committed to it (the platform fills in the validation set).
        "spec": order.spec,
        "state": task.state,
        "rounds": rows,
        "final_accuracy": rows[-1]["accuracy"] if rows else None,
        "budget_wei": str(task.budget_wei),
        "payouts_wei": {a: str(v) for a, v in payouts.items()},
        "refund_wei": str(refund),
        "contributions": contributions,
        "stakes_wei": {a: str(v) for a, v in deposits.items()},
        "stakes_returned_wei": {a: str(v) for a, v in returned.items()},
        "stakes_slashed_wei": {a: str(v) for a, v in slashed.items()},
        # payouts + refund + stakes returned + slashed == budget + stakes
        "conserved": sum(payouts.values()) + refund + sum(returned.values()) + sum(slashed.values())
        == task.budget_wei + sum(deposits.values()),
        "killed_device": killed,
        "devices": dict(names),
        "model_id": None,
        "model_verified": False,
    }
    if task.state == "finalized":
        account = wallet_account(wallet=wallet_of(user=buyer))
        model = final_model_fetch(chain_task_id=task.chain_task_id, account=account)
        with model.file:
            data = model.file.read()
        (out / model.filename).write_bytes(data)
        summary["model_id"] = model.model_id
        # Checked again here, whole: header, leaves, every chunk, and the ID the chain holds.
        summary["model_verified"] = id_hex(model_id(data)) == model.model_id
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def withdraw_all(up: dict, *, buyer_username: str) -> dict:
    """Every device with a credit withdraws it with `python -m worker withdraw` (on the host it
    runs on: ``up["hosts"]`` may give a command prefix per device name), all at once as
    devices of their own would, the buyer with the website's service meanwhile; each
    account's credit and balance before and after."""
    from django.contrib.auth import get_user_model

    from chain.withdrawals import balance_of
    from marketplace import contract, services

    market = contract.market()
    accounts = {_config(h)["address"]: (name, h) for name, h in up["homes"].items()}
    buyer = get_user_model().objects.get(username=buyer_username)
    accounts[buyer.wallet.address] = ("buyer", None)
    before = {address: balance_of(market=market, address=address) for address in accounts}
    done: dict[str, tuple[int, int]] = {}  # address -> (withdrawn, fee)
    with contextlib.ExitStack() as running:  # each CLI waited for, also on an error
        withdrawing = {
            address: running.enter_context(
                subprocess.Popen(
                    [
                        *up.get("hosts", {}).get(name, []),
                        *(PY, "-m", "worker", "withdraw", "--home", str(home), "--json"),
                    ],
                    env=up["env"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            for address, (name, home) in accounts.items()
            if home is not None and before[address].credit_wei
        }
        if before[buyer.wallet.address].credit_wei:
            paid = services.wallet_withdraw(wallet=buyer.wallet)
            done[buyer.wallet.address] = (paid.amount_wei, paid.fee_wei)
        for address, cli in withdrawing.items():
            out, err = cli.communicate()
            if cli.returncode:
                name = accounts[address][0]
                raise RuntimeError(
                    f"{name}'s withdrawal exited with {cli.returncode}: {err[-2000:]}"
                )
            answer = json.loads(out.splitlines()[-1])
            done[address] = (int(answer["amount_wei"]), int(answer["fee_wei"]))
    result = {}
    for address, (name, _) in accounts.items():
        withdrawn, fee = done.get(address, (0, 0))
        after = balance_of(market=market, address=address)
        entry = {
            "name": name,
            "credit_wei": before[address].credit_wei,
            "withdrawn_wei": withdrawn,
            "fee_wei": fee,
            "credit_after_wei": after.credit_wei,
            "wallet_before_wei": before[address].wallet_wei,
            "wallet_after_wei": after.wallet_wei,
            # Each account is up by its credit less the gas it paid, to the wei.
            "settled": after.credit_wei == 0
            and after.wallet_wei == before[address].wallet_wei + before[address].credit_wei - fee,
        }
        if withdrawn:
            say(f"{name} withdrew {withdrawn} wei (gas {fee} wei)")
        result[address] = {k: v if isinstance(v, bool | str) else str(v) for k, v in entry.items()}
    return result


def provenance_check(up: dict, *, task_id: int, spec: dict, out: Path) -> dict:
    """`python -m worker provenance` on the finished task, as anyone could run it: the chain,
    the contract and the aggregator's blobs, no platform database."""
    home = next(h for h in up["homes"].values() if _config(h)["may_aggregate"])
    config = _config(home)
    spec_file, report_file = out / "spec.json", out / "provenance.json"
    spec_file.write_text(json.dumps(spec, indent=2) + "\n")
    report_file.unlink(missing_ok=True)
    cli = subprocess.run(
        [
            PY, "-m", "worker", "provenance",
            "--rpc", config["eth_rpc_url"],
            "--contract", config["contract_address"],
            "--task", str(task_id),
            "--spec", str(spec_file),
            "--blobs", str(home),
            "--json", str(report_file),
        ],
        env=up["env"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    print(cli.stdout, end="", flush=True)
    if not report_file.exists():
        say(f"provenance failed: {cli.stderr.strip()}")
        return {"verified": False, "rounds": 0}
    report = json.loads(report_file.read_text())
    return {"verified": report["verified"], "rounds": len(report["rounds"]) - 1}


def budget_for(*, rounds: int, trainers: int) -> int:
    """A budget for ``rounds`` rounds of ``trainers`` local devices: room for every trainer at
    the highest local price and for the aggregator, and a refund left over."""
    prices = [d.price_wei for d in LOCAL_DEVICES if not d.aggregator]
    agg = max(d.aggregator_price_wei for d in LOCAL_DEVICES if d.aggregator)
    return rounds * (trainers * max(prices) + agg) * 3 // 2


def demo(
    var: Path,
    *,
    trainers: int,
    rounds: int,
    round_timeout_s: int,
    kill_in_round: int | None,
    timeout_s: float,
    min_accuracy: float,
    bidding_window_s: int,
    dispute_window_s: int,
) -> int:
    """`make demo`: the local stack, headless, runs one task end to end and checks it."""
    budget_wei = budget_for(rounds=rounds, trainers=trainers)
    with stack(var=var, quiet_web=True) as up:
        summary = follow_task(
            up,
            out=var / "demo",
            spec_fields={**DEMO_SPEC, "rounds": rounds},
            trainers=trainers,
            budget_wei=budget_wei,
            round_timeout_s=round_timeout_s,
            kill_in_round=kill_in_round,
            timeout_s=timeout_s,
            bidding_window_s=bidding_window_s,
            dispute_window_s=dispute_window_s,
        )
        if summary["state"] == "finalized":
            summary["provenance"] = provenance_check(
                up,
                task_id=summary["task_id"],
                spec=summary["spec"],
                out=var / "demo",
            )
            summary["withdrawals"] = withdraw_all(up, buyer_username=up["buyer"]["username"])
            (var / "demo" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, names=summary["devices"])
    problems = []
    unsettled = [w["name"] for w in summary.get("withdrawals", {}).values() if not w["settled"]]
    if summary["state"] == "finalized" and (unsettled or not summary.get("withdrawals")):
        problems.append(f"withdrawals did not settle: {', '.join(unsettled) or 'none ran'}")
    if summary["state"] != "finalized":
        problems.append(f"the task ended {summary['state']}, not finalized")
    if not summary["conserved"]:
        problems.append("payouts + refund + stakes back + slashed != budget + stakes")
    if summary["state"] == "finalized" and not summary.get("provenance", {}).get("verified"):
        problems.append("the task's models were not all recomputed to their on-chain IDs")
    if not summary["model_verified"]:
        problems.append("the downloaded model does not match its on-chain ID")
    if (summary["final_accuracy"] or 0) < min_accuracy:
        problems.append(f"final accuracy {summary['final_accuracy']} is below {min_accuracy}")
    for problem in problems:
        say(f"FAILED: {problem}")
    say(f"summary written to {var / 'demo' / 'summary.json'}")
    return 1 if problems else 0


def _print_summary(summary: dict, *, names: dict[str, str]) -> None:
    print(f"\n{'round':>5} {'accuracy':>9} {'loss':>8} {'updates':>7} {'gas':>9} {'wall_s':>7}")
    for r in summary["rounds"]:
        print(
            f"{r['round']:>5} {r['accuracy'] or 0:>9.4f} {r['loss'] or 0:>8.4f} "
            f"{r['updates']:>7} {r['gas']:>9} {r['wall_s']:>7.2f}"
        )
    print("\npayouts (wei):")
    for address, wei in summary["payouts_wei"].items():
        print(f"  {names.get(address.lower(), '?'):<12} {address}  {wei}")
    print(f"  {'refund':<12} {'(buyer)':<42}  {summary['refund_wei']}")
    print(f"  {'budget':<12} {'':<42}  {summary['budget_wei']}")
    print("stakes and bond (wei): paid in / returned / slashed")
    for address, wei in summary["stakes_wei"].items():
        back = summary["stakes_returned_wei"].get(address, "0")
        lost = summary["stakes_slashed_wei"].get(address, "0")
        print(f"  {names.get(address.lower(), '?'):<12} {address}  {wei} / {back} / {lost}")
    print(f"payouts + refund + stakes back + slashed == budget + stakes: {summary['conserved']}")
    if contributions := summary.get("contributions"):
        print("\ncontribution scores per round (uint16; '-' left out, 'n/a' unscored), pay (wei):")
        for address, c in contributions.items():
            cells = " ".join(
                f"{'-' if not a else 'n/a' if s is None else s:>5}"
                for s, a in zip(c["scores"], c["aggregated"], strict=True)
            )
            print(f"  {c['name']:<12} {address}  {cells}  {c['paid_wei']:>20}")
    print(f"model {summary['model_id']} verified against the chain: {summary['model_verified']}")
    if provenance := summary.get("provenance"):
        print(
            f"provenance: {provenance['rounds']} round(s) recomputed from the chain and the "
            f"blobs: {'verified' if provenance['verified'] else 'NOT VERIFIED'}"
        )
    if withdrawals := summary.get("withdrawals"):
        print("withdrawals (credit -> 0, account + credit - gas):")
        for address, w in withdrawals.items():
            print(
                f"  {w['name']:<12} {address:<42}  {w['withdrawn_wei']:>20} wei  "
                f"gas {w['fee_wei']:>16}  {'settled' if w['settled'] else 'NOT SETTLED'}"
            )
