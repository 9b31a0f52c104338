"""Fetching a task's final model from its aggregator's data plane, checked against the chain.

The web server fetches on the buyer's behalf, signing the data-plane request with the buyer's
custodial key (the aggregator's policy lets a task's buyer fetch its global models); the blob
is verified against the ID the contract holds before a byte of it reaches the buyer.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_account.signers.local import LocalAccount

from chain.events import TaskState
from core.errors import FlexError
from dataplane.client import fetch_model
from marketplace import contract
from marketplace.models import Device

# The web request waits for the fetch: keep retries short, a buyer can click again.
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
    data: bytes

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
    """The final model's bytes, fetched as ``account`` and checked against its on-chain ID.

    Raises ModelNotReadyError, ModelUnavailableError, or the data plane's own errors
    (AccessDeniedError, ModelIdMismatchError, ...), all FlexErrors.
    """
    round_number, model_id, aggregator = final_model_id(chain_task_id=chain_task_id)
    device = Device.objects.filter(address=aggregator).exclude(dataplane_url="").first()
    if device is None:
        raise ModelUnavailableError(
            "The aggregator has not told the platform where its model store is.",
            aggregator=aggregator,
        )
    data = fetch_model(
        base_url=device.dataplane_url,
        model_id=model_id,
        server_address=aggregator,
        account=account,
        timeout=FETCH_TIMEOUT_S,
        retries=FETCH_RETRIES,
    )
    return FinalModel(
        chain_task_id=chain_task_id,
        round_number=round_number,
        model_id=model_id,
        aggregator=aggregator,
        data=data,
    )
