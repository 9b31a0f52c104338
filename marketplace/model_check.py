"""The buyer's check of a final model: the trainers' watcher check, run by the platform.

Before the model card calls a final model verified, the platform recomputes it from the last
round's updates and the weights on chain, as a trainer's watcher does (dataplane.audit
.check_round), on every chunk: each chunk of each included update and of the model is
fetched from the aggregator's data plane with its proof, as the buyer (whose custodial key
signs the requests: a task's buyer may fetch single chunks of its updates), checked against
its ID on chain, and the model's values compared with the recomputation. Equal everywhere,
the model is the aggregate its ID claims. Every global model before it was checked by the
trainers that trained from it, within its own dispute window.

It runs in the platform worker (marketplace.model_check), never in a web request, and
imports no TensorFlow: the arithmetic is numpy's.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from chain.errors import ChainUnavailableError
from chain.events import TaskState as ChainTaskState
from core.errors import FlexError
from core.messages import TaskStep
from core.queues import PLATFORM_QUEUE
from dataplane.audit import Aggregator, Watch, check_round
from dataplane.client import fetch_model
from marketplace import contract
from marketplace.lifecycle import dispatch
from marketplace.models import Device, ModelCheck, Task
from marketplace.wallets import wallet_account, wallet_of
from training.serialize import decode
from training.spec import TaskSpec

log = logging.getLogger(__name__)

# Every chunk: the buyer's check recomputes the whole model, not a sample.
ALL_CHUNKS = 1 << 32
# A check that could not be made is tried again when the card is shown this much later.
RECHECK_AFTER = timedelta(minutes=1)


def model_check_due(*, task: Task) -> tuple[ModelCheck | None, bool]:
    """The check of ``task``'s final model (None before the model is out) and whether it is
    due to run: new, or not made and old enough to try again (then it is CHECKING)."""
    final = task.round_set.filter(number=task.rounds).first()
    if final is None or task.state not in ("trained", "finalized"):
        return None, False
    check, created = ModelCheck.objects.get_or_create(
        model_id=final.global_model_id.lower(), defaults={"task": task}
    )
    stale = check.updated_at < timezone.now() - RECHECK_AFTER
    if created or (check.state == ModelCheck.State.UNCHECKED and stale):
        if not created:
            check.state, check.detail = ModelCheck.State.CHECKING, ""
            check.save()
        return check, True
    return check, False


def model_check_request(*, task: Task) -> ModelCheck | None:
    """The check of ``task``'s final model, queued on the platform worker when it is due."""
    check, due = model_check_due(task=task)
    if due:
        step = TaskStep.of(contract.deployment_identity(), task_id=task.chain_task_id)
        transaction.on_commit(
            lambda: dispatch("marketplace.model_check", queue=PLATFORM_QUEUE, message=step)
        )
    return check


def model_check(*, task_id: int) -> ModelCheck | None:
    """Check task ``task_id``'s final model and store the result (VERIFIED, WRONG with the
    round, chunk and value, or UNCHECKED with why); None when it has no final model."""
    task = Task.objects.filter(chain_task_id=task_id).first()
    check = model_check_due(task=task)[0] if task is not None else None
    if check is None:
        return None
    try:
        watch = _watch(task)
    except ChainUnavailableError:
        raise  # the Celery task retries: the chain, not the model, is missing
    except FlexError as exc:
        check.state, check.detail = ModelCheck.State.UNCHECKED, f"{exc.code}: {exc.message}"[:300]
    else:
        check.chunks_checked = len(watch.chunks_checked)
        if watch.correct:
            check.state, check.detail = ModelCheck.State.VERIFIED, ""
        else:
            proof = watch.challenge
            check.state = ModelCheck.State.WRONG
            check.detail = (
                f"global model {watch.global_model} of round {watch.round_number + 1} differs "
                f"from the aggregate of its updates at chunk {proof.chunk}, value {proof.offset}"
            )
    check.save()
    log.info("task %s: final model %s: %s %s", task_id, check.model_id, check.state, check.detail)
    return check


def _watch(task: Task) -> Watch:
    market = contract.market()
    info = market.task(task_id=task.chain_task_id)
    if info.state not in (ChainTaskState.TRAINED, ChainTaskState.FINALIZED):
        raise ModelCheckError("the task has no final model on chain", state=info.state.name)
    order = task.order
    spec = TaskSpec.from_dict(order.spec) if order is not None and order.spec else None
    if spec is None or spec.hash_hex.lower() != info.spec_hash.lower():
        raise ModelCheckError("the task's spec is not known to the platform")
    device = (
        Device.objects.filter(address__iexact=info.aggregator)
        .exclude(dataplane_url="")
        .exclude(dataplane_cert_sha256="")
        .first()
    )
    if device is None:
        raise ModelCheckError("the aggregator has not told the platform where its store is")
    aggregator = Aggregator(
        address=info.aggregator, url=device.dataplane_url, cert_sha256=device.dataplane_cert_sha256
    )
    if task.buyer is None:
        raise ModelCheckError("the task was not posted from a website account")
    account = wallet_account(wallet=wallet_of(user=task.buyer))
    model_id = market.global_model(task_id=task.chain_task_id, round_number=info.rounds)
    blob = fetch_model(
        base_url=aggregator.url,
        cert_sha256=aggregator.cert_sha256,
        model_id=model_id,
        server_address=aggregator.address,
        account=account,
    )
    return check_round(
        market=market,
        store=None,
        account=account,
        spec=spec,
        task_id=task.chain_task_id,
        round_number=info.rounds - 1,
        published=decode(blob, expected_id=model_id),
        aggregator=aggregator,
        limit=ALL_CHUNKS,
    )


class ModelCheckError(FlexError):
    """The final model cannot be checked (no model, spec or data-plane address known)."""

    code = "model_check_unavailable"
