"""The typed Python client of FlexMarket: deploy, every transaction, every view, the hint."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeVar

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import ContractLogicError, TimeExhausted, Web3RPCError

from chain import events as ev
from chain.build import load_artifact
from chain.errors import (
    CONTRACT_ERRORS,
    ChainUnavailableError,
    ContractError,
    TransactionRejectedError,
)
from chain.events import (
    ChainEvent,
    DeviceClass,
    DeviceStatus,
    FailureReason,
    Role,
    TaskState,
    snake_case,
    to_python,
)
from chain.node import max_fee_per_gas, reachable

__all__ = [
    "BidInfo",
    "Deployed",
    "DeviceClass",
    "DeviceInfo",
    "DeviceStatus",
    "FailureReason",
    "FlexMarket",
    "Limits",
    "MinPrices",
    "Role",
    "RoundInfo",
    "SelectionInfo",
    "SelectionPlan",
    "TaskInfo",
    "TaskState",
    "TxResult",
    "call_artifact",
    "decode_revert",
    "deploy_artifact",
    "mask_of",
    "plan_selection",
    "positions_of",
    "selection_order",
    "transact_artifact",
    "transfer_eth",
]

CONTRACT_NAME = "FlexMarket"
# Head room over eth_estimateGas: state may move between the estimate and inclusion.
GAS_MARGIN_PERCENT = 20
GAS_MARGIN_MIN = 20_000
# EIP-7825 (Osaka) caps a transaction's gas; staying under it keeps one code path for both.
MAX_TX_GAS = 2**24
RECEIPT_TIMEOUT_SECONDS = 120.0
NONCE_ATTEMPTS = 3

_ERROR_STRING_SELECTOR = keccak(text="Error(string)")[:4]
_PANIC_SELECTOR = keccak(text="Panic(uint256)")[:4]

E = TypeVar("E", bound=ChainEvent)
R = TypeVar("R")


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class TxResult:
    """A mined, successful transaction and the FlexMarket events it emitted."""

    tx_hash: str
    block_number: int
    block_hash: str
    gas_used: int
    effective_gas_price_wei: int
    events: tuple[ChainEvent, ...]

    @property
    def fee_wei(self) -> int:
        return self.gas_used * self.effective_gas_price_wei

    def all(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]

    def first(self, kind: type[E]) -> E:
        """The first event of ``kind``; LookupError if the transaction emitted none."""
        for event in self.events:
            if isinstance(event, kind):
                return event
        raise LookupError(f"transaction {self.tx_hash} emitted no {kind.__name__}")


@dataclass(frozen=True)
class MinPrices:
    min_trainer_price_wei: int
    min_aggregator_price_wei: int


@dataclass(frozen=True)
class Limits:
    max_trainers: int
    max_rounds: int
    max_bids: int
    max_round_timeout: int


@dataclass(frozen=True)
class DeviceInfo:
    status: DeviceStatus
    device_class: DeviceClass
    can_aggregate: bool

    @property
    def active(self) -> bool:
        return self.status == DeviceStatus.ACTIVE


@dataclass(frozen=True)
class TaskInfo:
    """A task as the contract holds it; deadlines are unix times, 0 when not applicable."""

    buyer: str
    state: TaskState
    spec_hash: str
    budget_wei: int
    rounds: int
    min_trainers: int
    max_trainers: int
    bidding_ends: int
    round_timeout: int
    min_trainer_price_wei: int
    min_aggregator_price_wei: int
    bid_count: int
    aggregator: str
    aggregator_price_wei: int
    trainer_count: int
    published_rounds: int
    phase_start: int
    submission_deadline: int
    publish_deadline: int

    @property
    def current_round(self) -> int | None:
        """The round trainers train in now (latest published global model), if any."""
        return self.published_rounds - 1 if self.published_rounds else None


@dataclass(frozen=True)
class BidInfo:
    index: int
    device: str
    price_per_round_wei: int
    samples: int
    role: Role


@dataclass(frozen=True)
class SelectionInfo:
    """Who a task selected; ``trainers[i]`` is trainer position i (its bit in the masks)."""

    aggregator: str
    aggregator_price_wei: int
    trainers: tuple[str, ...]
    trainer_prices_wei: tuple[int, ...]


@dataclass(frozen=True)
class RoundInfo:
    """Round r: its global model, the updates submitted in it, and which of them (with
    which scores, empty = unscored) the global model of r+1 aggregated."""

    global_model: str | None
    submitted_mask: int
    aggregated_mask: int
    scores: tuple[int, ...]


@dataclass(frozen=True)
class SelectionPlan:
    """What selectNodes will do with a set of bids: the chosen bid indices or a failure."""

    aggregator_index: int | None
    trainer_indices: tuple[int, ...]
    failure: FailureReason | None


# ---------------------------------------------------------------- pure helpers


def selection_order(bids: Iterable[BidInfo]) -> list[int]:
    """The hint selectNodes verifies: every trainer bid index, by price per sample, then
    index. Fractions compare exactly like the contract's cross-multiplication."""
    trainer_bids = [b for b in bids if b.role == Role.TRAINER]
    trainer_bids.sort(key=lambda b: (Fraction(b.price_per_round_wei, b.samples), b.index))
    return [b.index for b in trainer_bids]


def plan_selection(
    *,
    bids: Sequence[BidInfo],
    rounds: int,
    budget_wei: int,
    min_trainers: int,
    max_trainers: int,
    devices: Mapping[str, DeviceInfo] | None = None,
) -> SelectionPlan:
    """The contract's selection rule replayed off chain (for previews and checks).

    ``devices`` gives each bidder's registry entry at selection time; without it every
    bidder counts as active (and aggregator bidders as able to aggregate).
    """

    def active(device: str) -> bool:
        return devices is None or devices[device].active

    def may_aggregate(device: str) -> bool:
        return devices is None or (devices[device].active and devices[device].can_aggregate)

    aggregator: BidInfo | None = None
    for bid in bids:
        if bid.role != Role.AGGREGATOR or not may_aggregate(bid.device):
            continue
        if aggregator is None or bid.price_per_round_wei < aggregator.price_per_round_wei:
            aggregator = bid
    if aggregator is None:
        return SelectionPlan(None, (), FailureReason.NO_AGGREGATOR)
    committed = aggregator.price_per_round_wei * rounds
    if committed > budget_wei:
        return SelectionPlan(None, (), FailureReason.AGGREGATOR_OVER_BUDGET)
    by_index = {b.index: b for b in bids}
    chosen: list[int] = []
    for index in selection_order(bids):
        if len(chosen) == max_trainers:
            break
        bid = by_index[index]
        cost = bid.price_per_round_wei * rounds
        if committed + cost <= budget_wei and active(bid.device):
            committed += cost
            chosen.append(index)
    if len(chosen) < min_trainers:
        return SelectionPlan(None, (), FailureReason.TOO_FEW_TRAINERS)
    return SelectionPlan(aggregator.index, tuple(chosen), None)


def mask_of(positions: Iterable[int]) -> int:
    """The bitmask naming trainer ``positions`` (bit i = position i)."""
    mask = 0
    for p in positions:
        mask |= 1 << p
    return mask


def positions_of(mask: int) -> list[int]:
    """The trainer positions named by ``mask``, ascending."""
    return [i for i in range(mask.bit_length()) if (mask >> i) & 1]


def _bytes32(value: bytes | str) -> bytes:
    raw = bytes(HexBytes(value))
    if len(raw) != 32:
        raise ValueError(f"expected 32 bytes, got {len(raw)}")
    return raw


def _optional_id(raw: bytes) -> str | None:
    return None if raw == bytes(32) else "0x" + bytes(raw).hex()


# ---------------------------------------------------------------- revert decoding


@functools.cache
def _error_abis() -> dict[bytes, Mapping[str, Any]]:
    """4-byte selector -> custom error ABI, from the compiled artefact."""
    abi = load_artifact(CONTRACT_NAME)["abi"]
    return {
        keccak(text=f"{e['name']}({','.join(i['type'] for i in e['inputs'])})")[:4]: e
        for e in abi
        if e["type"] == "error"
    }


def decode_revert(data: bytes | str | None) -> ContractError:
    """The ``chain.errors`` exception for a revert's return data, fields in snake_case."""
    raw = bytes(HexBytes(data)) if data else b""
    selector, payload = raw[:4], raw[4:]
    entry = _error_abis().get(selector)
    if entry is not None:
        values = abi_decode([i["type"] for i in entry["inputs"]], payload)
        found = {
            snake_case(i["name"]): to_python(v, i["type"], i.get("internalType"))
            for i, v in zip(entry["inputs"], values, strict=True)
        }
        cls = CONTRACT_ERRORS.get(entry["name"])
        if cls is None:
            return ContractError(f"FlexMarket reverted with {entry['name']}", **found)
        return cls(**found)
    if selector == _ERROR_STRING_SELECTOR:
        (reason,) = abi_decode(["string"], payload)
        return ContractError(f"FlexMarket reverted: {reason}", reason=reason)
    if selector == _PANIC_SELECTOR:
        (code,) = abi_decode(["uint256"], payload)
        return ContractError(f"FlexMarket panicked with code {code:#x}", panic=code)
    return ContractError("FlexMarket reverted without a known error", data="0x" + raw.hex())


def _revert_data(exc: Exception) -> str | None:
    """The revert return data web3 attached to ``exc``, wherever this web3 version put it."""
    data = getattr(exc, "data", None)
    if isinstance(data, str | bytes) and data:
        return data if isinstance(data, str) else "0x" + data.hex()
    response = getattr(exc, "rpc_response", None) or {}
    error = response.get("error") if isinstance(response, dict) else None
    if isinstance(error, dict):
        data = error.get("data")
        if isinstance(data, dict):
            data = data.get("data")
        if isinstance(data, str) and data.startswith("0x"):
            return data
    return None


def _is_revert(exc: Exception) -> bool:
    if isinstance(exc, ContractLogicError):
        return True
    return _revert_data(exc) is not None or "revert" in str(exc).lower()


@contextlib.contextmanager
def _rpc() -> Iterator[None]:
    """Turns a lost node into ChainUnavailableError and a revert into its typed error."""
    try:
        with reachable():
            yield
    except (ContractLogicError, Web3RPCError) as exc:
        if _is_revert(exc):
            raise decode_revert(_revert_data(exc)) from exc
        raise TransactionRejectedError(f"the node refused the request: {exc}") from exc


# ---------------------------------------------------------------- nonces

# One lock per sending address for this process: taking the nonce from the node's pending
# count and handing the signed transaction to the node happen under it, so several sends
# from one account (several threads, or in a row) never reuse a nonce. The node's count is
# the source of truth (it survives evm_revert and restarts, where a local counter would
# leave a gap). Another process signing with the same key can still take a nonce first:
# the send then retries with the next one (_send_with_fresh_nonce).
_NONCE_LOCKS: dict[str, threading.Lock] = {}
_NONCE_LOCKS_GUARD = threading.Lock()


def _nonce_lock(address: str) -> threading.Lock:
    with _NONCE_LOCKS_GUARD:
        return _NONCE_LOCKS.setdefault(address, threading.Lock())


# ---------------------------------------------------------------- the client


class FlexMarket:
    """One deployed FlexMarket: typed, keyword-only calls; senders sign locally."""

    def __init__(
        self,
        *,
        w3: Web3,
        address: str,
        deploy_block: int | None = None,
        receipt_timeout: float = RECEIPT_TIMEOUT_SECONDS,
    ) -> None:
        artefact = load_artifact(CONTRACT_NAME)
        self.w3 = w3
        self.address = to_checksum_address(address)
        self.deploy_block = deploy_block
        self.receipt_timeout = receipt_timeout
        self.abi: list[dict[str, Any]] = artefact["abi"]
        self._contract = w3.eth.contract(address=self.address, abi=self.abi)
        self._outputs = {e["name"]: e["outputs"] for e in self.abi if e["type"] == "function"}

    def __repr__(self) -> str:
        return f"FlexMarket(address={self.address!r})"

    # ------------------------------------------------------------ deploy

    @classmethod
    def deploy(
        cls,
        *,
        w3: Web3,
        sender: LocalAccount,
        min_trainer_price_wei: int = 0,
        min_aggregator_price_wei: int = 0,
    ) -> FlexMarket:
        """Deploys a new market owned by ``sender`` (also its first registrar)."""
        deployed = deploy_artifact(
            w3=w3,
            sender=sender,
            name=CONTRACT_NAME,
            args=(min_trainer_price_wei, min_aggregator_price_wei),
        )
        return cls(w3=w3, address=deployed.address, deploy_block=deployed.block_number)

    # ------------------------------------------------------------ owner and registrar

    def transfer_ownership(self, *, sender: LocalAccount, new_owner: str) -> TxResult:
        return self._transact(sender, "transferOwnership", to_checksum_address(new_owner))

    def set_registrar(self, *, sender: LocalAccount, registrar: str) -> TxResult:
        return self._transact(sender, "setRegistrar", to_checksum_address(registrar))

    def set_min_prices(
        self,
        *,
        sender: LocalAccount,
        min_trainer_price_wei: int,
        min_aggregator_price_wei: int,
    ) -> TxResult:
        """Platform minimum prices per round for tasks created from now on."""
        return self._transact(
            sender, "setMinPrices", min_trainer_price_wei, min_aggregator_price_wei
        )

    def register_device(
        self,
        *,
        sender: LocalAccount,
        device: str,
        device_class: DeviceClass,
        can_aggregate: bool,
    ) -> TxResult:
        return self._transact(
            sender,
            "registerDevice",
            to_checksum_address(device),
            int(device_class),
            can_aggregate,
        )

    def revoke_device(self, *, sender: LocalAccount, device: str) -> TxResult:
        return self._transact(sender, "revokeDevice", to_checksum_address(device))

    # ------------------------------------------------------------ tasks

    def create_task(
        self,
        *,
        sender: LocalAccount,
        spec_hash: bytes | str,
        rounds: int,
        min_trainers: int,
        max_trainers: int,
        bidding_ends: int,
        round_timeout: int,
        budget_wei: int,
    ) -> TxResult:
        """Creates a task with ``budget_wei`` in escrow; ``bidding_ends`` is a unix time,
        ``round_timeout`` seconds. The new id is ``result.first(TaskCreated).task_id``."""
        return self._transact(
            sender,
            "createTask",
            _bytes32(spec_hash),
            rounds,
            min_trainers,
            max_trainers,
            bidding_ends,
            round_timeout,
            value=budget_wei,
        )

    def cancel_task(self, *, sender: LocalAccount, task_id: int) -> TxResult:
        return self._transact(sender, "cancelTask", task_id)

    def place_bid(
        self,
        *,
        sender: LocalAccount,
        task_id: int,
        price_per_round_wei: int,
        samples: int,
        role: Role,
    ) -> TxResult:
        """Places, or replaces, ``sender``'s bid on the task."""
        return self._transact(sender, "placeBid", task_id, price_per_round_wei, samples, int(role))

    def select_nodes(
        self,
        *,
        sender: LocalAccount,
        task_id: int,
        order: Sequence[int] | None = None,
    ) -> TxResult:
        """Runs selection; without ``order`` the hint is computed from the chain's bids."""
        if order is None:
            order = selection_order(self.bids(task_id=task_id))
        return self._transact(sender, "selectNodes", task_id, list(order))

    # ------------------------------------------------------------ rounds

    def publish_global_model(
        self,
        *,
        sender: LocalAccount,
        task_id: int,
        round_number: int,
        model_id: bytes | str,
        aggregated_mask: int = 0,
        scores: Sequence[int] = (),
    ) -> TxResult:
        """Publishes global model ``round_number``; for rounds >= 1, ``aggregated_mask``
        (see mask_of) names the round-1 updates used, ``scores`` one per set bit or none."""
        return self._transact(
            sender,
            "publishGlobalModel",
            task_id,
            round_number,
            _bytes32(model_id),
            aggregated_mask,
            list(scores),
        )

    def submit_update(
        self,
        *,
        sender: LocalAccount,
        task_id: int,
        round_number: int,
        model_id: bytes | str,
    ) -> TxResult:
        return self._transact(sender, "submitUpdate", task_id, round_number, _bytes32(model_id))

    # ------------------------------------------------------------ settlement

    def finalize(self, *, sender: LocalAccount, task_id: int) -> TxResult:
        return self._transact(sender, "finalize", task_id)

    def abort(self, *, sender: LocalAccount, task_id: int) -> TxResult:
        return self._transact(sender, "abort", task_id)

    def withdraw(self, *, sender: LocalAccount) -> TxResult:
        return self._transact(sender, "withdraw")

    # ------------------------------------------------------------ views

    def owner(self) -> str:
        return self._call("owner")

    def registrar(self) -> str:
        return self._call("registrar")

    def min_prices(self) -> MinPrices:
        trainer, aggregator = self._call("minPrices")
        return MinPrices(trainer, aggregator)

    def limits(self) -> Limits:
        return Limits(
            max_trainers=self._call("MAX_TRAINERS"),
            max_rounds=self._call("MAX_ROUNDS"),
            max_bids=self._call("MAX_BIDS"),
            max_round_timeout=self._call("MAX_ROUND_TIMEOUT"),
        )

    def device(self, *, device: str) -> DeviceInfo:
        return self._record(DeviceInfo, "deviceInfo", to_checksum_address(device))

    def task_count(self) -> int:
        return self._call("taskCount")

    def task(self, *, task_id: int) -> TaskInfo:
        return self._record(TaskInfo, "task", task_id)

    def bids(self, *, task_id: int) -> list[BidInfo]:
        raw = self._call("bids", task_id)
        components = self._outputs["bids"][0]["components"]
        return [BidInfo(index=i, **_struct(components, values)) for i, values in enumerate(raw)]

    def bid_index_of(self, *, task_id: int, device: str) -> int | None:
        found, index = self._call("bidIndexOf", task_id, to_checksum_address(device))
        return index if found else None

    def selection(self, *, task_id: int) -> SelectionInfo | None:
        """The aggregator and trainers, or None before a successful selection."""
        info = self.task(task_id=task_id)
        if info.state in (TaskState.BIDDING, TaskState.CANCELLED) or info.trainer_count == 0:
            return None
        devices, prices = self._call("trainers", task_id)
        return SelectionInfo(
            aggregator=info.aggregator,
            aggregator_price_wei=info.aggregator_price_wei,
            trainers=tuple(to_checksum_address(d) for d in devices),
            trainer_prices_wei=tuple(prices),
        )

    def trainer_position(self, *, task_id: int, device: str) -> int | None:
        selected, position = self._call("trainerPosition", task_id, to_checksum_address(device))
        return position if selected else None

    def global_model(self, *, task_id: int, round_number: int) -> str | None:
        """The global model ID of the round as ``0x`` hex, None if not published."""
        return _optional_id(self._call("globalModel", task_id, round_number))

    def update_of(self, *, task_id: int, round_number: int, trainer: str) -> str | None:
        """The update ID ``trainer`` submitted in the round, None if it did not."""
        raw = self._call("updateOf", task_id, round_number, to_checksum_address(trainer))
        return _optional_id(raw)

    def round_info(self, *, task_id: int, round_number: int) -> RoundInfo:
        """Round r's global model (None if unpublished), the updates submitted in it, and
        which of them (with which scores) global model r+1 aggregated."""
        found = self._struct_of("roundInfo", task_id, round_number)
        found["global_model"] = _optional_id(bytes(HexBytes(found["global_model"])))
        return RoundInfo(**found)

    def credit_of(self, *, account: str) -> int:
        """Wei ``account`` may withdraw now."""
        return self._call("creditOf", to_checksum_address(account))

    def credits_owed(self) -> int:
        return self._call("creditsOwed")

    def escrow_locked(self) -> int:
        return self._call("escrowLocked")

    def balance_wei(self) -> int:
        """The contract's ether balance (creditsOwed + escrowLocked, barring forced sends)."""
        with _rpc():
            return self.w3.eth.get_balance(self.address)

    def scan(
        self, *, from_block: int | None = None, to_block: int, chunk: int = 2000
    ) -> Iterator[ev.ScannedChunk]:
        """This market's events, chunk by chunk (see chain.events.scan)."""
        start = (self.deploy_block or 0) if from_block is None else from_block
        return ev.scan(self.w3, self.address, start, to_block, chunk=chunk)

    # ------------------------------------------------------------ plumbing

    def _call(self, name: str, *args: Any) -> Any:
        with _rpc():
            return getattr(self._contract.functions, name)(*args).call()

    def _struct_of(self, name: str, *args: Any) -> dict[str, Any]:
        return _struct(self._outputs[name][0]["components"], self._call(name, *args))

    def _record(self, cls: type[R], name: str, *args: Any) -> R:
        return cls(**self._struct_of(name, *args))

    def _transact(self, sender: LocalAccount, name: str, *args: Any, value: int = 0) -> TxResult:
        data = self._contract.encode_abi(name, args=list(args))
        receipt = _send(
            self.w3,
            sender,
            {"to": self.address, "data": data, "value": value},
            receipt_timeout=self.receipt_timeout,
        )
        return _tx_result(receipt, market=self.address)


# ---------------------------------------------------------------- any compiled contract


@dataclass(frozen=True)
class Deployed:
    address: str
    block_number: int
    tx_hash: str


def deploy_artifact(
    *, w3: Web3, sender: LocalAccount, name: str, args: Sequence[Any] = ()
) -> Deployed:
    """Deploys the contract ``name`` of contracts/build/ (FlexMarket, test contracts)."""
    artefact = load_artifact(name)
    constructor = next((e for e in artefact["abi"] if e["type"] == "constructor"), None)
    types = [i["type"] for i in constructor["inputs"]] if constructor else []
    data = bytes(HexBytes(artefact["bytecode"])) + abi_encode(types, list(args))
    receipt = _send(w3, sender, {"data": "0x" + data.hex(), "value": 0})
    return Deployed(
        address=to_checksum_address(receipt["contractAddress"]),
        block_number=receipt["blockNumber"],
        tx_hash="0x" + bytes(receipt["transactionHash"]).hex(),
    )


def transact_artifact(
    *,
    w3: Web3,
    sender: LocalAccount,
    name: str,
    address: str,
    function: str,
    args: Sequence[Any] = (),
    value_wei: int = 0,
    market: str | None = None,
) -> TxResult:
    """Calls ``function`` of a deployed ``name`` contract in a signed transaction; FlexMarket
    events (of ``market`` when given) are decoded into the result, reverts into errors."""
    contract = w3.eth.contract(address=to_checksum_address(address), abi=load_artifact(name)["abi"])
    data = contract.encode_abi(function, args=list(args))
    receipt = _send(w3, sender, {"to": contract.address, "data": data, "value": value_wei})
    return _tx_result(receipt, market=market)


def call_artifact(
    *, w3: Web3, name: str, address: str, function: str, args: Sequence[Any] = ()
) -> Any:
    """Reads ``function`` of a deployed ``name`` contract."""
    contract = w3.eth.contract(address=to_checksum_address(address), abi=load_artifact(name)["abi"])
    with _rpc():
        return getattr(contract.functions, function)(*args).call()


def _tx_result(receipt: Any, *, market: str | None) -> TxResult:
    return TxResult(
        tx_hash="0x" + bytes(receipt["transactionHash"]).hex(),
        block_number=receipt["blockNumber"],
        block_hash="0x" + bytes(receipt["blockHash"]).hex(),
        gas_used=receipt["gasUsed"],
        effective_gas_price_wei=receipt["effectiveGasPrice"],
        events=tuple(ev.decode_logs(receipt["logs"], address=market)),
    )


def _struct(components: Sequence[Mapping[str, Any]], values: Sequence[Any]) -> dict[str, Any]:
    """An ABI tuple as keyword arguments of the matching record (snake_case names)."""
    return {
        snake_case(c["name"]): to_python(v, c["type"], c.get("internalType"))
        for c, v in zip(components, values, strict=True)
    }


def _send(
    w3: Web3,
    sender: LocalAccount,
    call: dict[str, Any],
    *,
    receipt_timeout: float = RECEIPT_TIMEOUT_SECONDS,
) -> Any:
    """Estimates, signs with ``sender``'s key, sends raw and waits for the receipt.

    A revert found by the estimate raises its typed error before anything is sent; a
    transaction that reverts once mined is replayed with eth_call to decode why.
    """
    tx: dict[str, Any] = {"from": sender.address, **call}
    with _rpc():
        chain_id = w3.eth.chain_id
        with _nonce_lock(sender.address):
            # Against the pending block: its time is the one the transaction will run at, so
            # a deadline that has passed by the chain's clock has passed for the estimate too.
            estimate = w3.eth.estimate_gas(tx, "pending")
            margin = max(estimate * GAS_MARGIN_PERCENT // 100, GAS_MARGIN_MIN)
            tx.update(
                chainId=chain_id,
                gas=min(estimate + margin, MAX_TX_GAS),
                maxPriorityFeePerGas=w3.eth.max_priority_fee,
                maxFeePerGas=max_fee_per_gas(w3),
            )
            tx_hash = _send_with_fresh_nonce(w3, sender, tx)
        try:
            receipt = w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=receipt_timeout, poll_latency=0.05
            )
        except TimeExhausted as exc:
            raise ChainUnavailableError(
                "transaction was not mined in time", tx_hash="0x" + bytes(tx_hash).hex()
            ) from exc
        if receipt["status"] != 1:
            _raise_mined_revert(w3, tx, receipt)
    return receipt


def _send_with_fresh_nonce(w3: Web3, sender: LocalAccount, tx: dict[str, Any]) -> Any:
    """Signs with the node's pending nonce and sends; if another signer of the same key took
    that nonce meanwhile, takes the next one (a few times) instead of failing."""
    for attempt in range(NONCE_ATTEMPTS):
        tx["nonce"] = w3.eth.get_transaction_count(sender.address, "pending")
        signed = sender.sign_transaction(tx)
        try:
            return w3.eth.send_raw_transaction(signed.raw_transaction)
        except Web3RPCError as exc:
            clash = "nonce" in str(exc).lower() or "already known" in str(exc).lower()
            if not clash or attempt == NONCE_ATTEMPTS - 1:
                raise TransactionRejectedError(
                    f"the node refused the transaction: {exc}", sender=sender.address
                ) from exc
    raise AssertionError("unreachable")  # pragma: no cover


def _raise_mined_revert(w3: Web3, tx: Mapping[str, Any], receipt: Any) -> None:
    """Replays a transaction that reverted once mined, to decode why.

    The replay runs on the state before its block with that block's number and time as
    block overrides: an estimate can pass at one timestamp and the mined call fail at the
    next (a deadline crossed in between), and only the mined block's time reproduces it.
    """
    replay = {k: tx[k] for k in ("from", "to", "data", "gas") if k in tx}
    replay["value"] = hex(tx.get("value", 0))
    replay["gas"] = hex(replay["gas"])
    number = receipt["blockNumber"]
    block = w3.eth.get_block(number)
    overrides = {"number": hex(number), "time": hex(block["timestamp"])}
    response = w3.provider.make_request(
        "eth_call", [replay, hex(max(number - 1, 0)), {}, overrides]
    )
    error = response.get("error")
    if isinstance(error, dict):
        data = error.get("data")
        if isinstance(data, dict):
            data = data.get("data")
        if isinstance(data, str) and data.startswith("0x") and len(data) >= 10:
            raise decode_revert(data)
    tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
    raise ContractError("transaction reverted (out of gas?)", tx_hash=tx_hash)


def transfer_eth(*, w3: Web3, sender: LocalAccount, to: str, value_wei: int) -> str:
    """Sends ``value_wei`` of plain ETH (e.g. gas money for a new device); returns the tx hash."""
    receipt = _send(w3, sender, {"to": to_checksum_address(to), "value": value_wei})
    return "0x" + bytes(receipt["transactionHash"]).hex()
