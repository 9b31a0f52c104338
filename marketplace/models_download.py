"""Fetching a task's final model from its aggregator's data plane, checked against the chain.

The web server fetches on the buyer's behalf, signing the data-plane request with the buyer's
custodial key (the aggregator's policy lets a task's buyer fetch its global models), over TLS
pinned to the certificate the aggregator registered. The blob is streamed to a temporary file
(never held whole in memory) under a total deadline, and verified against the ID the contract
holds before a byte of it reaches the buyer.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import BinaryIO

from django.conf import settings
from eth_account.signers.local import LocalAccount

from chain.events import TaskState
from core.errors import FlexError
from dataplane.client import fetch_model_to
from marketplace import contract
from marketplace.models import Device

# The web request waits for the fetch: keep retries short, a buyer can click again. Each read
# waits FETCH_TIMEOUT_S at most; the whole fetch FLEX_MODEL_DOWNLOAD_DEADLINE_S.
FETCH_TIMEOUT_S = 30.0
FETCH_RETRIES = 1


class ModelNotReadyError(FlexError):
    """The task has no final model yet."""

    code = "model_not_ready"


class NotTaskBuyerError(FlexError):
    """Only the task's buyer may do this."""

    code = "not_task_buyer"


class ModelUnavailableError(FlexError):
    """The aggregator's model store cannot be reached."""

    code = "model_unavailable"


@dataclass(frozen=True)
class FinalModel:
    chain_task_id: int
    round_number: int
    model_id: str
    aggregator: str
    file: BinaryIO  # verified bytes, at their start; closing it deletes them
    size: int

    @property
    def filename(self) -> str:
        return f"flex-task-{self.chain_task_id}-round-{self.round_number}-{self.model_id}.flexmodel"


def final_model_id(*, chain_task_id: int) -> tuple[int, str, str]:
    """(round, model ID, aggregator) of the task's final global model as the chain holds it."""
    market = contract.market()
    info = market.task(task_id=chain_task_id)
    if info.state not in (TaskState.TRAINED, TaskState.FINALIZED):
        raise ModelNotReadyError(
            f"The task is {info.state.name.lower()}; its model is ready once it is trained.",
            state=info.state.name.lower(),
        )
    model_id = market.global_model(task_id=chain_task_id, round_number=info.rounds)
    if model_id is None:  # a trained task always has it; guard against a contract change
        raise ModelNotReadyError(round_number=info.rounds)
    return info.rounds, model_id, info.aggregator


def final_model_fetch(*, chain_task_id: int, account: LocalAccount) -> FinalModel:
    """The final model, fetched as ``account`` into a temporary file and checked against its
    on-chain ID; the caller closes ``file``.

    Raises ModelNotReadyError, ModelUnavailableError, or the data plane's own errors
    (AccessDeniedError, PeerCertificateError, FetchDeadlineError, ModelIdMismatchError, ...),
    all FlexErrors.
    """
    round_number, model_id, aggregator = final_model_id(chain_task_id=chain_task_id)
    device = (
        Device.objects.filter(address=aggregator)
        .exclude(dataplane_url="")
        .exclude(dataplane_cert_sha256="")
        .first()
    )
    if device is None:
        raise ModelUnavailableError(
            "The aggregator has not told the platform where its model store is.",
            aggregator=aggregator,
        )
    spool = tempfile.TemporaryFile(prefix="flex-model-")  # noqa: SIM115  (handed to the caller)
    try:
        size = fetch_model_to(
            sink=spool,
            base_url=device.dataplane_url,
            cert_sha256=device.dataplane_cert_sha256,
            model_id=model_id,
            server_address=aggregator,
            account=account,
            timeout=FETCH_TIMEOUT_S,
            deadline_s=settings.FLEX_MODEL_DOWNLOAD_DEADLINE_S,
            retries=FETCH_RETRIES,
        )
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return FinalModel(
        chain_task_id=chain_task_id,
        round_number=round_number,
        model_id=model_id,
        aggregator=aggregator,
        file=spool,
        size=size,
    )
