"""People of the website in tests: buyers with funded wallets, their tasks, and devices
enrolled the way `worker join` does it."""

from __future__ import annotations

from datetime import timedelta

from eth_account.messages import encode_defunct

from chain.events import Role
from core.enrolment import join_message
from marketplace import services
from marketplace.models import TaskOrder
from training.spec import TaskSpec

PASSWORD = "a-long-enough-passphrase-42"
# What the devices of one_round_selected bid per round.
PRICE_WEI = 2 * 10**14


def buyer_signup(username: str):
    user = services.user_signup(username=username, password=PASSWORD)
    services.wallet_fund(wallet=user.wallet)
    return user


def task_post(
    buyer, *, title="Digits", rounds=1, window_s=600, round_timeout_s=600, dispute_window_s=0
) -> TaskOrder:
    return services.task_create(
        buyer=buyer,
        title=title,
        spec=TaskSpec(model="digits-mlp", dataset="digits-8x8", rounds=rounds),
        min_trainers=1,
        max_trainers=2,
        bidding_window_s=window_s,
        round_timeout_s=round_timeout_s,
        # No disputes unless a test is about them: it may finalize right after the last round.
        dispute_window_s=dispute_window_s,
        budget_wei=10**16,
    )


def device_enrol(
    account,
    *,
    name: str,
    may_aggregate: bool = False,
    dataplane_url: str = "",
    cert: str = "",
    **prices: int,
):
    """A device enrolled the way `worker join` does it: token, signed challenge, registration."""
    issued = services.join_token_issue(
        label=name, ttl=timedelta(hours=1), may_aggregate=may_aggregate
    )
    token = services.join_challenge_issue(raw_token=issued.raw)
    text = join_message(challenge=token.challenge, address=account.address)
    signature = account.sign_message(encode_defunct(text=text)).signature
    return services.device_enrol(
        raw_token=issued.raw,
        address=account.address,
        signature="0x" + bytes(signature).hex(),
        name=name,
        device_class="gpu" if may_aggregate else "cpu",
        dataplane_url=dataplane_url,
        dataplane_cert_sha256=cert,
        **prices,
    )


def one_round_selected(
    buyer, market, w3, *, aggregator, trainer, plane_url: str, cert: str, window_s: int
) -> TaskOrder:
    """A one-round task of ``buyer``, ``aggregator`` (serving its data
    plane at ``plane_url``) and ``trainer`` enrolled, bid at PRICE_WEI and selected."""
    device_enrol(aggregator, name="gpu-box", may_aggregate=True, dataplane_url=plane_url, cert=cert)
    device_enrol(trainer, name="pixel-7")
    task = task_post(buyer, rounds=1, window_s=window_s)
    tid = task.chain_task_id
    for device, role, samples in ((aggregator, Role.AGGREGATOR, 0), (trainer, Role.TRAINER, 500)):
        market.place_bid(
            sender=device, task_id=tid, price_per_round_wei=PRICE_WEI, samples=samples, role=role
        )
    w3.provider.make_request("evm_mine", [market.task(task_id=tid).bidding_ends])
    market.select_nodes(sender=aggregator, task_id=tid)
    return task
