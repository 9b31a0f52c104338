"""The fraud proof of a global model: the typed client of FlexVerifier (docs/verifiable.md).

A challenge opens one chunk of the global model and of every update it includes and names
one coordinate of that chunk; the contract checks each opening against its model ID and
recomputes the coordinate by the task's strategy. Openings are plain bytes here: building
them from model blobs is the data plane's and the worker's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from hexbytes import HexBytes
from web3 import Web3

from chain.build import load_artifact
from chain.errors import (  # noqa: F401  (the verifier's errors, re-exported for its callers)
    BadChunkError,
    BadProofError,
    BadTrimError,
    ChunkOutOfRangeError,
    FlexVerifierError,
    IdMismatchError,
    LengthMismatchError,
    OffsetOutOfRangeError,
    TooManyUpdatesError,
)
from chain.events import Reason, Strategy, Verdict
from chain.transactions import deploy_artifact, rpc

VERIFIER_NAME = "FlexVerifier"


class Opened(Protocol):
    """One chunk of one model with what ties it to the model's ID (the model format's
    ChunkOpening): the header's bytes, the Merkle root, the chunk's values (int32,
    big-endian) and its path to the root."""

    header: bytes
    root: bytes
    values: bytes
    siblings: tuple[bytes, ...]


def _opening(opened: Opened) -> tuple[bytes, bytes, bytes, list[bytes]]:
    return (opened.header, opened.root, opened.values, list(opened.siblings))


@dataclass(frozen=True)
class Included:
    """An update a global model includes: its ID, its author and its FedAvg weight."""

    model_id: str
    trainer: str
    weight: int


@dataclass(frozen=True)
class RoundContext:
    """The round a global model closes: the updates of ``round_number`` make global
    ``round_number + 1`` of ``task_id`` on ``market``."""

    chain_id: int
    market: str
    task_id: int
    round_number: int
    strategy: Strategy
    trim_per_mille: int = 0

    def encoded(self) -> tuple[Any, ...]:
        return (
            self.chain_id,
            to_checksum_address(self.market),
            self.task_id,
            self.round_number,
            int(self.strategy),
            self.trim_per_mille,
        )


@dataclass(frozen=True)
class Challenge:
    """Everything one challenge sends: the coordinate, the global model and its updates."""

    context: RoundContext
    global_id: str
    included: tuple[Included, ...]
    chunk: int
    offset: int
    global_opening: Opened
    updates: tuple[Opened, ...]

    def args(self) -> list[Any]:
        return [
            self.context.encoded(),
            bytes(HexBytes(self.global_id)),
            [
                (bytes(HexBytes(u.model_id)), to_checksum_address(u.trainer), u.weight)
                for u in self.included
            ],
            (self.chunk, self.offset),
            _opening(self.global_opening),
            [_opening(u) for u in self.updates],
        ]

    def dispute(self) -> tuple[Any, ...]:
        """What FlexMarket.challenge takes: the market supplies the context, the global ID,
        the trainers and the weights from its own storage."""
        return (
            [bytes(HexBytes(u.model_id)) for u in self.included],
            (self.chunk, self.offset),
            _opening(self.global_opening),
            [_opening(u) for u in self.updates],
        )


# One statement entry: position (1 byte), reason (1 byte), evidence model ID (32 bytes).
STATEMENT_ENTRY_BYTES = 34
ZERO_ID = "0x" + "00" * 32


@dataclass(frozen=True)
class Exclusion:
    """Why a global model left out the update of trainer ``position``: a Reason and, for
    COPIED, the ID of the earlier model of the task whose values it repeats."""

    position: int
    reason: Reason
    evidence: str = ZERO_ID

    @staticmethod
    def encode_all(exclusions: Sequence[Exclusion]) -> bytes:
        """The statement publishGlobalModel takes and UpdatesExcluded carries."""
        return b"".join(
            bytes([e.position, int(e.reason)]) + bytes(HexBytes(e.evidence)).rjust(32, b"\0")
            for e in exclusions
        )

    @staticmethod
    def decode_all(statement: bytes | str) -> tuple[Exclusion, ...]:
        """The exclusions a statement gives, first entry per position; a statement of a
        length the contract reads as stating nothing gives none."""
        raw = bytes(HexBytes(statement))
        if len(raw) % STATEMENT_ENTRY_BYTES:
            return ()
        found: dict[int, Exclusion] = {}
        for at in range(0, len(raw), STATEMENT_ENTRY_BYTES):
            position, code = raw[at], raw[at + 1]
            reason = Reason(code) if code in Reason._value2member_map_ else Reason.UNSTATED
            evidence = "0x" + raw[at + 2 : at + STATEMENT_ENTRY_BYTES].hex()
            found.setdefault(position, Exclusion(position, reason, evidence))
        return tuple(found.values())


@dataclass(frozen=True)
class Contest:
    """What contesting an exclusion opens: the header and Merkle root of the excluded update,
    of the global model that left it out and, for COPIED, of the model it is said to copy."""

    update_id: str
    update: tuple[bytes, bytes]
    global_model: tuple[bytes, bytes]
    evidence_id: str = ZERO_ID
    evidence: tuple[bytes, bytes] = (b"", b"\0" * 32)

    @classmethod
    def of(
        cls,
        *,
        update_id: str,
        update: Opened,
        global_model: Opened,
        evidence_id: str = ZERO_ID,
        evidence: Opened | None = None,
    ) -> Contest:
        """The contest from any chunk's opening of each model (only header and root count)."""
        return cls(
            update_id=update_id,
            update=(update.header, update.root),
            global_model=(global_model.header, global_model.root),
            evidence_id=evidence_id,
            evidence=(evidence.header, evidence.root) if evidence else (b"", b"\0" * 32),
        )

    def encoded(self) -> tuple[Any, ...]:
        return (
            bytes(HexBytes(self.update_id)),
            self.update[0],
            self.update[1],
            self.global_model[0],
            self.global_model[1],
            bytes(HexBytes(self.evidence_id)),
            self.evidence[0],
            self.evidence[1],
        )


@dataclass(frozen=True)
class Finding:
    """The contract's answer to a challenge: the verdict, the update it names (for
    INVALID_UPDATE) and, for a value, the global model's and the recomputed one."""

    verdict: Verdict
    which: int
    claimed: int
    expected: int

    @property
    def fraud(self) -> bool:
        return self.verdict != Verdict.CORRECT


class FlexVerifier:
    """One deployed FlexVerifier."""

    def __init__(self, *, w3: Web3, address: str) -> None:
        self.w3 = w3
        self.address = to_checksum_address(address)
        self._contract = w3.eth.contract(
            address=self.address, abi=load_artifact(VERIFIER_NAME)["abi"]
        )

    @classmethod
    def deploy(cls, *, w3: Web3, sender: LocalAccount) -> FlexVerifier:
        deployed = deploy_artifact(w3=w3, sender=sender, name=VERIFIER_NAME)
        return cls(w3=w3, address=deployed.address)

    def check(self, challenge: Challenge) -> Finding:
        """The contract's finding; raises a FlexVerifierError subclass (a revert naming what
        did not hold: an ID, a proof, a chunk or offset out of range) for a bad challenge."""
        with rpc():
            verdict, which, claimed, expected = self._contract.functions.check(
                *challenge.args()
            ).call()
        return Finding(Verdict(verdict), which, claimed, expected)

    def gas(self, challenge: Challenge, *, sender: str) -> int:
        """Gas of sending the challenge in a transaction from ``sender``."""
        with rpc():
            return self._contract.functions.check(*challenge.args()).estimate_gas(
                {"from": to_checksum_address(sender)}
            )
