"""Payout rows: each credit the contract made to an account."""

from __future__ import annotations

from marketplace.models import Payout, PayoutReason
from marketplace.sync.records import MirrorEvent

_CREDIT_REASONS = {
    "trainer_pay": PayoutReason.TRAINER_PAY,
    "aggregator_pay": PayoutReason.AGGREGATOR_PAY,
    "refund": PayoutReason.REFUND,
    "stake_returned": PayoutReason.STAKE_RETURNED,
    "stake_slashed": PayoutReason.STAKE_SLASHED,
    "challenge_bounty": PayoutReason.CHALLENGE_BOUNTY,
}


def payment_credited(mirror, e: MirrorEvent) -> None:
    task = mirror.task_of(e)
    if task is None:
        return
    a = e.args
    Payout.objects.create(
        task=task,
        tx_hash=e.tx_hash,
        block_number=e.block_number,
        log_index=e.log_index,
        account=a["account"],
        amount_wei=int(a["amount_wei"]),
        reason=_CREDIT_REASONS[a["reason"]],
    )
    mirror.touched.add(task.chain_task_id)


WRITERS = {"PaymentCredited": payment_credited}
