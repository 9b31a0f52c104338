"""What the live push sends per round, for `python -m bench.sync`: a buyer's socket follows a
task through many rounds (trainers submit, the aggregator publishes and reports its metrics,
chain sync mirrors each round), and the bytes it receives for each round are counted. The
goal: independent of the number of earlier rounds."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

ROUNDS = 30
TRAINERS = 4
PRICE_WEI = 10**12
BUDGET_WEI = 10**18
TIMEOUT_S = 60.0


def buyer_headers(buyer: LocalAccount) -> list[tuple[bytes, bytes]]:
    """A browser of the account whose wallet is ``buyer`` (made on first use), logged in."""
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import Client

    from marketplace.models import Wallet

    user, made = get_user_model().objects.get_or_create(username="bench-buyer")
    if made:
        Wallet.objects.create(user=user, address=buyer.address, encrypted_key="-")
    client = Client()
    client.force_login(user)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    return [(b"origin", b"http://localhost"), (b"cookie", cookie.encode())]


def _model(label: str) -> str:
    return "0x" + keccak(text=f"bench-push-{label}").hex()


def measure_push(market: Any, owner: LocalAccount, buyer: LocalAccount) -> dict[str, Any]:
    from channels.testing import WebsocketCommunicator

    from chain.events import DeviceClass, Role, TaskCreated
    from chain.node import chain_time
    from chain.selection import mask_of
    from flexsite.asgi import application
    from marketplace import reports
    from marketplace.selectors import task_views_by_id
    from marketplace.sync import ChainSync
    from marketplace.sync.push import task_push_seq
    from marketplace.task_page import task_update_message

    w3 = market.w3
    headers = buyer_headers(buyer)  # the buyer's account first: sync links the task to it
    aggregator, *trainers = (Account.create() for _ in range(1 + TRAINERS))
    for node in (aggregator, *trainers):
        w3.provider.make_request("anvil_setBalance", [node.address, hex(10**21)])
        market.register_device(
            sender=owner,
            device=node.address,
            device_class=DeviceClass.CPU,
            can_aggregate=node is aggregator,
        )
    task_id = (
        market.create_task(
            sender=buyer,
            spec_hash=keccak(text="push"),
            rounds=ROUNDS,
            min_trainers=TRAINERS,
            max_trainers=TRAINERS,
            bidding_ends=chain_time(w3) + 60,
            round_timeout=600,
            budget_wei=BUDGET_WEI,
        )
        .first(TaskCreated)
        .task_id
    )
    market.place_bid(
        sender=aggregator, task_id=task_id, price_per_round_wei=PRICE_WEI, samples=0,
        role=Role.AGGREGATOR,
    )  # fmt: skip
    for trainer in trainers:
        market.place_bid(
            sender=trainer, task_id=task_id, price_per_round_wei=PRICE_WEI, samples=100,
            role=Role.TRAINER,
        )  # fmt: skip
    w3.provider.make_request("evm_increaseTime", [61])
    w3.provider.make_request("evm_mine", [])
    market.select_nodes(sender=aggregator, task_id=task_id)
    market.publish_global_model(
        sender=aggregator, task_id=task_id, round_number=0, model_id=_model("r0")
    )
    sync = ChainSync(market=market)
    sync.run()
    by_address = {t.address: t for t in trainers}
    positions = market.selection(task_id=task_id).trainers

    def play(number: int) -> None:
        for address in positions:
            market.submit_update(
                sender=by_address[address],
                task_id=task_id,
                round_number=number - 1,
                model_id=_model(f"u{number}-{address}"),
            )
        global_id = _model(f"r{number}")
        published = market.publish_global_model(
            sender=aggregator,
            task_id=task_id,
            round_number=number,
            model_id=global_id,
            aggregated_mask=mask_of(range(len(positions))),
        )
        sync.run()
        reports.round_metrics_record(
            task_id=task_id,
            round_number=number,
            model_id=global_id,
            tx_hash=published.tx_hash,
            accuracy=0.5,
            loss=1.0,
            gas_used=published.gas_used,
        )

    def measured(message: dict, number: int) -> bool:
        return any(
            r["number"] == number and r["accuracy"] is not None
            for r in message["snapshot"]["rounds_published"]
        )

    async def follow() -> tuple[list[int], list[int]]:
        socket = WebsocketCommunicator(application, f"/ws/tasks/{task_id}/", headers=headers)
        connected, _ = await socket.connect(timeout=TIMEOUT_S)
        if not connected:
            raise RuntimeError("the buyer's socket was refused")
        await socket.receive_from(timeout=TIMEOUT_S)
        sizes, counts = [], []
        for number in range(1, ROUNDS + 1):
            await asyncio.to_thread(play, number)
            size = count = 0
            while True:  # until the round's metrics have arrived
                text = await socket.receive_from(timeout=TIMEOUT_S)
                size, count = size + len(text.encode()), count + 1
                if measured(json.loads(text), number):
                    break
            sizes.append(size)
            counts.append(count)
        await socket.disconnect()
        return sizes, counts

    sizes, counts = asyncio.run(follow())
    seq = task_push_seq(chain_task_id=task_id)
    [view] = task_views_by_id(chain_task_ids=[task_id])
    snapshot = len(json.dumps(task_update_message(view, seq=seq)).encode())
    # The last round ends the training: compare the rounds that are alike, the 2nd to the
    # last but one.
    steady = sizes[1:-1]
    return {
        "rounds": ROUNDS,
        "trainers": TRAINERS,
        "messages_per_round": max(counts),
        "bytes_round_2": sizes[1],
        "bytes_round_last_but_one": sizes[-2],
        "growth_bytes_per_round": round((steady[-1] - steady[0]) / (len(steady) - 1), 1),
        "snapshot_bytes_at_end": snapshot,
        "bytes_per_round": sizes,
    }
