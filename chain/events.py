"""FlexMarket's events as typed records, decoded from the ABI, and a chunked log scanner."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

from eth_abi import decode as abi_decode
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import Web3RPCError
from web3.types import RPCEndpoint

from chain.build import load_artifact
from chain.enums import (  # noqa: F401  (the enums events carry, importable from here too)
    ENUMS,
    CreditReason,
    DeviceClass,
    DeviceStatus,
    FailureReason,
    Reason,
    Role,
    Strategy,
    TaskState,
    Verdict,
)
from chain.errors import ChainUnavailableError
from chain.node import UNREACHABLE, reachable
from core.addresses import checksum_address

# ---------------------------------------------------------------- ABI value conversion


@functools.cache
def snake_case(name: str) -> str:
    """``taskId`` -> ``task_id``, ``minTrainerPriceWei`` -> ``min_trainer_price_wei`` (the
    ABI's few names, converted once: a task's bids decode them a thousand times a read)."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def to_python(value: Any, abi_type: str, internal_type: str | None = None) -> Any:
    """An ABI-decoded value in FLEX's Python shape: checksummed addresses, ``0x`` hex
    bytes32, IntEnum for the contract's enums, tuples for arrays."""
    if abi_type.endswith("[]"):
        inner_internal = internal_type[:-2] if internal_type else None
        return tuple(to_python(v, abi_type[:-2], inner_internal) for v in value)
    if abi_type == "address":
        return checksum_address(value)
    if abi_type.startswith("bytes"):
        return "0x" + bytes(value).hex()
    if internal_type and internal_type.startswith("enum "):
        return ENUMS[internal_type.rsplit(".", 1)[-1]](value)
    return value


# ---------------------------------------------------------------- event records


@dataclass(frozen=True, kw_only=True)
class ChainEvent:
    """Where an event happened; subclasses add the event's own arguments (snake_case)."""

    name: ClassVar[str] = ""
    block_number: int
    block_hash: str
    tx_hash: str
    log_index: int
    address: str
    # The block's timestamp, where the node puts it in the log (Anvil and Geth do; the
    # JSON-RPC spec leaves it out): one eth_getBlockByNumber less for whoever needs it.
    block_time: int | None = None

    @property
    def key(self) -> tuple[str, int]:
        """What a mirror upserts on: the transaction and the log's index in its block."""
        return (self.tx_hash, self.log_index)


E = TypeVar("E", bound=ChainEvent)
EVENT_TYPES: dict[str, type[ChainEvent]] = {}


def _event(cls: type[E]) -> type[E]:
    cls.name = cls.__name__
    EVENT_TYPES[cls.name] = cls
    return cls


@_event
@dataclass(frozen=True, kw_only=True)
class OwnershipTransferred(ChainEvent):
    previous_owner: str
    new_owner: str


@_event
@dataclass(frozen=True, kw_only=True)
class RegistrarChanged(ChainEvent):
    previous_registrar: str
    new_registrar: str


@_event
@dataclass(frozen=True, kw_only=True)
class MinPricesChanged(ChainEvent):
    min_trainer_price_wei: int
    min_aggregator_price_wei: int


@_event
@dataclass(frozen=True, kw_only=True)
class DeviceRegistered(ChainEvent):
    device: str
    device_class: DeviceClass
    can_aggregate: bool


@_event
@dataclass(frozen=True, kw_only=True)
class DeviceRevoked(ChainEvent):
    device: str


@_event
@dataclass(frozen=True, kw_only=True)
class TaskCreated(ChainEvent):
    task_id: int
    buyer: str
    spec_hash: str
    budget_wei: int
    rounds: int
    min_trainers: int
    max_trainers: int
    bidding_ends: int
    round_timeout: int
    min_trainer_price_wei: int
    min_aggregator_price_wei: int
    sample_cap: int


@_event
@dataclass(frozen=True, kw_only=True)
class DisputeTermsSet(ChainEvent):
    task_id: int
    dispute_window: int
    strategy: Strategy
    trim_per_mille: int


@_event
@dataclass(frozen=True, kw_only=True)
class BidPlaced(ChainEvent):
    task_id: int
    device: str
    bid_index: int
    role: Role
    price_per_round_wei: int
    samples: int
    replaced: bool
    deposit_wei: int


@_event
@dataclass(frozen=True, kw_only=True)
class BidWithdrawn(ChainEvent):
    task_id: int
    device: str
    bid_index: int
    moved_device: str


@_event
@dataclass(frozen=True, kw_only=True)
class NodesSelected(ChainEvent):
    task_id: int
    aggregator: str
    aggregator_price_wei: int
    trainers: tuple[str, ...]
    trainer_prices_wei: tuple[int, ...]
    seed: str


@_event
@dataclass(frozen=True, kw_only=True)
class TaskFailed(ChainEvent):
    task_id: int
    reason: FailureReason
    selectable_trainers: int


@_event
@dataclass(frozen=True, kw_only=True)
class TaskCancelled(ChainEvent):
    task_id: int


@_event
@dataclass(frozen=True, kw_only=True)
class GlobalModelPublished(ChainEvent):
    task_id: int
    round: int
    model_id: str
    aggregated_mask: int
    scores: tuple[int, ...]


@_event
@dataclass(frozen=True, kw_only=True)
class UpdatesExcluded(ChainEvent):
    """Why global model ``round`` left out round-1 updates: the statement's bytes (see
    chain.fraud.Exclusion.decode_all)."""

    task_id: int
    round: int
    statement: str


@_event
@dataclass(frozen=True, kw_only=True)
class UpdateSubmitted(ChainEvent):
    task_id: int
    round: int
    trainer: str
    position: int
    model_id: str


@_event
@dataclass(frozen=True, kw_only=True)
class TaskFinalized(ChainEvent):
    task_id: int
    trainers_paid_wei: int
    aggregator_paid_wei: int
    refunded_wei: int
    slashed_wei: int


@_event
@dataclass(frozen=True, kw_only=True)
class TaskAborted(ChainEvent):
    task_id: int
    published_rounds: int
    trainers_paid_wei: int
    aggregator_paid_wei: int
    refunded_wei: int
    slashed_wei: int


@_event
@dataclass(frozen=True, kw_only=True)
class AggregateChallenged(ChainEvent):
    task_id: int
    round: int
    challenger: str
    verdict: Verdict
    chunk: int
    offset: int
    bounty_wei: int


@_event
@dataclass(frozen=True, kw_only=True)
class ExclusionContested(ChainEvent):
    task_id: int
    round: int
    challenger: str
    position: int
    reason: Reason
    bounty_wei: int


@_event
@dataclass(frozen=True, kw_only=True)
class PaymentCredited(ChainEvent):
    account: str
    task_id: int
    amount_wei: int
    reason: CreditReason


@_event
@dataclass(frozen=True, kw_only=True)
class Withdrawn(ChainEvent):
    account: str
    amount_wei: int


BASE_FIELDS = frozenset(f.name for f in fields(ChainEvent))


def event_fields(cls: type[ChainEvent]) -> list[str]:
    """The event's own argument fields, in ABI order."""
    return [f.name for f in fields(cls) if f.name not in BASE_FIELDS]


# ---------------------------------------------------------------- decoding


@dataclass(frozen=True)
class _EventAbi:
    name: str
    inputs: tuple[Mapping[str, Any], ...]


def _signature(entry: Mapping[str, Any]) -> str:
    types = ",".join(_canonical_type(i) for i in entry["inputs"])
    return f"{entry['name']}({types})"


def _canonical_type(param: Mapping[str, Any]) -> str:
    if param["type"].startswith("tuple"):
        inner = ",".join(_canonical_type(c) for c in param["components"])
        return f"({inner}){param['type'][5:]}"
    return param["type"]


@functools.cache
def _event_abis() -> dict[bytes, _EventAbi]:
    """topic0 -> event ABI, from the compiled artefact (never a hand-copied list)."""
    abi = load_artifact("FlexMarket")["abi"]
    return {
        keccak(text=_signature(e)): _EventAbi(e["name"], tuple(e["inputs"]))
        for e in abi
        if e["type"] == "event"
    }


def event_topics() -> dict[str, str]:
    """Event name -> its topic0 as ``0x`` hex."""
    return {e.name: "0x" + topic.hex() for topic, e in _event_abis().items()}


def _quantity(value: str | int | None) -> int | None:
    """A JSON-RPC quantity as web3 hands it over: hex text where it has no formatter."""
    return int(value, 16) if isinstance(value, str) else value


def decode_log(log: Mapping[str, Any]) -> ChainEvent | None:
    """The typed record of a FlexMarket log, or None for a log of some other event."""
    topics = [HexBytes(t) for t in log["topics"]]
    if not topics:
        return None
    entry = _event_abis().get(bytes(topics[0]))
    if entry is None:
        return None
    indexed = [i for i in entry.inputs if i["indexed"]]
    plain = [i for i in entry.inputs if not i["indexed"]]
    values: dict[str, Any] = {}
    for param, topic in zip(indexed, topics[1:], strict=True):
        (raw,) = abi_decode([param["type"]], bytes(topic))
        values[param["name"]] = raw
    decoded = abi_decode([p["type"] for p in plain], bytes(HexBytes(log["data"])))
    for param, raw in zip(plain, decoded, strict=True):
        values[param["name"]] = raw
    args = {
        snake_case(p["name"]): to_python(values[p["name"]], p["type"], p.get("internalType"))
        for p in entry.inputs
    }
    return EVENT_TYPES[entry.name](
        block_number=_quantity(log["blockNumber"]),
        block_hash=_hex(log["blockHash"]),
        tx_hash=_hex(log["transactionHash"]),
        log_index=_quantity(log["logIndex"]),
        address=checksum_address(log["address"]),
        block_time=_quantity(log.get("blockTimestamp")),
        **args,
    )


def get_logs(
    w3: Web3,
    *,
    address: str,
    from_block: int,
    to_block: int | str = "latest",
    topics: Sequence[Any] = (),
) -> list[Mapping[str, Any]]:
    """The logs eth_getLogs answers for ``address`` in the blocks given, as the node sends
    them (hex text, which decode_log reads): past web3's middleware and result formatters,
    which walk every field of every log and cost more than the request itself. A refusal
    raises Web3RPCError, as web3's own get_logs does; a lost node, what the provider raises."""
    block = hex if isinstance(to_block, int) else str
    params = {
        "address": address,
        "fromBlock": hex(from_block),
        "toBlock": block(to_block),
        "topics": list(topics),
    }
    response = w3.provider.make_request(RPCEndpoint("eth_getLogs"), [params])
    if "error" in response:
        raise Web3RPCError(str(response["error"]), rpc_response=response)
    return list(response["result"])


def decode_logs(
    logs: Sequence[Mapping[str, Any]], *, address: str | None = None
) -> list[ChainEvent]:
    """Typed records of the FlexMarket logs among ``logs`` (of ``address`` when given)."""
    records = []
    for log in logs:
        if address is not None and checksum_address(log["address"]) != address:
            continue
        record = decode_log(log)
        if record is not None:
            records.append(record)
    return records


def _hex(value: Any) -> str:
    return "0x" + bytes(HexBytes(value)).hex()


# ---------------------------------------------------------------- scanning


@dataclass(frozen=True)
class ScannedChunk:
    """One chunk of blocks, fully scanned: store ``events``, then move the cursor to
    ``to_block`` / ``to_block_hash`` (a later mismatch of that hash means a re-org)."""

    from_block: int
    to_block: int
    to_block_hash: str
    events: tuple[ChainEvent, ...]


def chunks(start: int, end: int, *, size: int) -> Iterator[tuple[int, int]]:
    """Inclusive block ranges of at most ``size`` blocks covering ``start..end``."""
    if size < 1:
        raise ValueError("chunk size must be at least 1")
    lo = start
    while lo <= end:
        hi = min(lo + size - 1, end)
        yield lo, hi
        lo = hi + 1


def safe_head(w3: Web3, *, confirmations: int = 0) -> int:
    """The newest block that has at least ``confirmations`` blocks on top of it."""
    with reachable():
        return max(w3.eth.block_number - confirmations, 0)


def scan(
    w3: Web3,
    address: str,
    from_block: int,
    to_block: int,
    *,
    chunk: int = 2000,
    min_chunk: int = 10,
    retries: int = 5,
    retry_delay: float = 0.5,
) -> Iterator[ScannedChunk]:
    """FlexMarket events of ``address`` in ``from_block..to_block``, one chunk at a time.

    In the shape of web3.py's event-scanner example, and like it apart from storing: the
    caller stores each chunk and only then advances its cursor, so a crash between two
    chunks rescans at most one. A node that refuses a range (too many results, timeouts)
    gets it again in halves down to ``min_chunk`` blocks; a chunk that found nothing lets
    the next one grow back towards ``chunk``. An unreachable node, after ``retries``
    attempts, is ChainUnavailableError.
    """
    address = to_checksum_address(address)
    # One OR-list in the first topic position: any FlexMarket event, nothing else.
    topics = [list(event_topics().values())]
    size = chunk
    lo = from_block
    while lo <= to_block:
        hi = min(lo + size - 1, to_block)
        block_hash = _block_hash(w3, hi, retries, retry_delay)
        try:
            logs = _get_logs(w3, address, lo, hi, topics, retries, retry_delay)
        except Web3RPCError as exc:
            if size <= min_chunk:
                raise ChainUnavailableError(
                    f"the node refused eth_getLogs for blocks {lo}..{hi}: {exc}"
                ) from exc
            size = max(size // 2, min_chunk)
            continue
        # A re-org between reading the hash and the logs would pair the cursor with logs
        # of another branch: read the range again.
        if _block_hash(w3, hi, retries, retry_delay) != block_hash:
            continue
        events = tuple(decode_logs(logs, address=address))
        yield ScannedChunk(lo, hi, block_hash, events)
        lo = hi + 1
        if not events:
            size = min(size * 2, chunk)


def _get_logs(
    w3: Web3,
    address: str,
    lo: int,
    hi: int,
    topics: list[list[str]],
    retries: int,
    retry_delay: float,
) -> list[Any]:
    return _with_retries(
        lambda: get_logs(w3, address=address, from_block=lo, to_block=hi, topics=topics),
        retries,
        retry_delay,
    )


def _block_hash(w3: Web3, number: int, retries: int, retry_delay: float) -> str:
    block = _with_retries(lambda: w3.eth.get_block(number), retries, retry_delay)
    return _hex(block["hash"])


def _with_retries(call: Any, retries: int, retry_delay: float) -> Any:
    for attempt in range(retries):
        try:
            return call()
        except UNREACHABLE as exc:
            if attempt == retries - 1:
                raise ChainUnavailableError(f"cannot reach the chain: {exc}") from exc
            time.sleep(retry_delay * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover
