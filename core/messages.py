"""The messages FLEX's processes send each other through the broker: typed, versioned records,
the same classes on the sending and the receiving side, checked on receipt.

Every message names the deployment it belongs to (chain id and contract address); a process
acts only on messages for its own and drops the others with a warning. Work the platform
sends a node names that node; a report a node sends the platform is signed with the node's
key (EIP-191 over the report's canonical JSON, RFC 8785), so it cannot speak for another.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any, Literal, Self

import rfc8785
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import is_hex_address
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)

from core.addresses import checksum_address
from core.errors import FlexError

log = logging.getLogger(__name__)

VERSION = 1


class MessageInvalidError(FlexError):
    """A message does not fit its schema; it was refused."""

    code = "message_invalid"


class ReportSignatureError(FlexError):
    """A report is not signed by the device it names; it was refused."""

    code = "report_signature_invalid"


def _address(value: str) -> str:
    if not isinstance(value, str) or not is_hex_address(value):
        raise ValueError("not an Ethereum address")
    return checksum_address(value)


def _finite(value: Any) -> Any:
    """A measurement that is not a finite number (a diverged loss) travels as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


Address = Annotated[str, AfterValidator(_address)]
Hash32 = Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{64}$")]
Measure = Annotated[float | None, BeforeValidator(_finite)]
Count = Annotated[int, Field(ge=0, lt=2**256)]
# A certificate's SHA-256 as 64 hex digits (how a node's data-plane certificate is pinned).
Fingerprint = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Deployment(BaseModel):
    """Which FlexMarket a process serves: the chain and the contract's address."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    chain_id: int = Field(ge=1)
    contract: Address


class Message(BaseModel):
    """What every message carries: the schema version and the deployment it belongs to."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)
    v: Literal[1] = VERSION
    chain_id: int = Field(ge=1)
    contract: Address

    @classmethod
    def parse(cls, data: Any) -> Self:
        """The message in ``data``, or MessageInvalidError saying what does not fit."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise MessageInvalidError(
                f"a {cls.__name__} message does not fit its schema: "
                + "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or '-'}: {e['msg']}" for e in exc.errors()
                ),
                schema=cls.__name__,
            ) from None

    @classmethod
    def of(cls, deployment: Deployment, **fields: Any) -> Self:
        return cls(chain_id=deployment.chain_id, contract=deployment.contract, **fields)

    @property
    def deployment(self) -> Deployment:
        return Deployment(chain_id=self.chain_id, contract=self.contract)

    def is_for(self, deployment: Deployment) -> bool:
        """Whether the message belongs to ``deployment``; logs a warning when it does not."""
        if self.deployment == deployment:
            return True
        log.warning(
            "dropped a %s message for chain %s contract %s: this process serves chain %s "
            "contract %s",
            type(self).__name__,
            self.chain_id,
            self.contract,
            deployment.chain_id,
            deployment.contract,
        )
        return False

    def dump(self) -> dict[str, Any]:
        """The message as JSON-ready data, the form it travels in."""
        return self.model_dump(mode="json")


# ---------------------------------------------------------------- platform -> node


class NodeWork(Message):
    """Work the platform addresses to one node (on that device's own queue)."""

    node: Address
    task_id: Count
    spec: dict[str, Any]


class BidRequest(NodeWork):
    """A task is open for bids: decide and place (or keep) a bid."""


class InitialModelRequest(NodeWork):
    """The node is the task's aggregator: publish the round-0 global model."""


class RoundTrainRequest(NodeWork):
    """Round ``round_number`` is open: fetch its global model, train, submit the update."""

    round_number: Count
    aggregator_url: str
    # The SHA-256 of the certificate the aggregator registered: its data plane is pinned to it.
    aggregator_cert_sha256: Fingerprint


class RoundAggregateRequest(NodeWork):
    """Round ``round_number`` is open: collect the trainers' updates and publish the next
    global model."""

    round_number: Count
    trainer_urls: dict[Address, str]
    trainer_certs_sha256: dict[Address, Fingerprint]


# ---------------------------------------------------------------- platform -> platform


class TaskStep(Message):
    """A platform transaction due for one task (select nodes, finalize, abort)."""

    task_id: Count


class RoundStep(TaskStep):
    """A step due for one round of a task (the reminder of a round its nodes did not start)."""

    round_number: Count


# ---------------------------------------------------------------- node -> platform


class Report(Message):
    """What a node measured about its own work, signed with its key."""

    device: Address
    task_id: Count
    round_number: Count
    model_id: Hash32
    tx_hash: Hash32
    signature: str = ""

    def signed_bytes(self) -> bytes:
        """What the device signs: the report's canonical JSON without the signature."""
        return rfc8785.dumps(self.model_dump(mode="json", exclude={"signature"}))

    def sign(self, account: LocalAccount) -> Self:
        if account.address != self.device:
            raise ReportSignatureError(
                "a device signs only its own reports", device=self.device, signer=account.address
            )
        signed = account.sign_message(encode_defunct(primitive=self.signed_bytes()))
        return self.model_copy(update={"signature": "0x" + bytes(signed.signature).hex()})

    def verify(self) -> Self:
        """The report itself when ``device`` signed it; ReportSignatureError otherwise."""
        try:
            signer = Account.recover_message(
                encode_defunct(primitive=self.signed_bytes()), signature=self.signature
            )
        except Exception as exc:  # eth_keys raises several unrelated types for bad input
            raise ReportSignatureError(
                "the report's signature is malformed", device=self.device
            ) from exc
        if signer != self.device:
            raise ReportSignatureError(device=self.device, signer=signer)
        return self


class RoundReport(Report):
    """The aggregator's measurements of the global model it published for ``round_number``."""

    kind: Literal["round"] = "round"
    accuracy: Measure = None
    loss: Measure = None
    gas_used: Count | None = None
    updates: Count | None = None
    aggregate_s: Measure = None
    # Submitted updates the aggregator left out: trainer -> the reason's code (a named rule
    # of docs/verifiable.md, or that the update could not be fetched).
    left_out: dict[Address, Annotated[str, Field(max_length=64)]] = Field(
        default_factory=dict, max_length=128
    )


class UpdateReport(Report):
    """A trainer's measurements, on its own data, of the update it submitted."""

    kind: Literal["update"] = "update"
    num_examples: Count | None = None
    loss: Measure = None
    accuracy: Measure = None
    train_s: Measure = None


_REPORT = TypeAdapter(Annotated[RoundReport | UpdateReport, Field(discriminator="kind")])


def report_parse(data: Any) -> RoundReport | UpdateReport:
    """A report of either kind, or MessageInvalidError; its signature is not checked here."""
    try:
        return _REPORT.validate_python(data)
    except ValidationError as exc:
        raise MessageInvalidError(
            f"a report does not fit its schema: {exc.error_count()} error(s), first "
            f"{exc.errors()[0]['msg']}",
            schema="Report",
        ) from None
