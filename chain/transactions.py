"""Signed transactions to any compiled contract: gas, nonces, receipts, and reverts decoded
into ``chain.errors`` classes. Nothing else in FLEX builds or sends a transaction."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_abi.grammar import ABIType, BasicType, TupleType
from eth_abi.grammar import parse as parse_abi_type
from eth_account.signers.local import LocalAccount
from eth_utils import (
    function_abi_to_4byte_selector,
    get_abi_input_types,
    get_abi_output_types,
    keccak,
    to_checksum_address,
)
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import (
    ContractLogicError,
    TransactionIndexingInProgress,
    TransactionNotFound,
    Web3RPCError,
)

from chain import events as ev
from chain.build import load_artifact
from chain.errors import (
    CONTRACT_ERRORS,
    ChainUnavailableError,
    ContractError,
    TransactionRejectedError,
)
from chain.events import snake_case, to_python
from chain.node import UNREACHABLE, at_once, chain_id, fee_cap, method_missing, reachable
from chain.records import TxResult
from core.addresses import checksum_address

CONTRACT_NAME = "FlexMarket"
# Head room over eth_estimateGas: state may move between the estimate and inclusion.
GAS_MARGIN_PERCENT = 20
GAS_MARGIN_MIN = 20_000
# EIP-7825 (Osaka) caps a transaction's gas; staying under it keeps one code path for both.
MAX_TX_GAS = 2**24
RECEIPT_TIMEOUT_SECONDS = 120.0
# The first and the longest wait between two asks for a receipt (PendingTx.receipt).
RECEIPT_POLL_S = (0.002, 0.5)
NONCE_ATTEMPTS = 3

_ERROR_STRING_SELECTOR = keccak(text="Error(string)")[:4]
_PANIC_SELECTOR = keccak(text="Panic(uint256)")[:4]


@functools.cache
def _error_abis() -> dict[bytes, Mapping[str, Any]]:
    """4-byte selector -> custom error ABI, from the compiled artefacts (the market's, and
    the verifier's, whose reverts a challenge passes on)."""
    return {
        keccak(text=f"{e['name']}({','.join(i['type'] for i in e['inputs'])})")[:4]: e
        for name in (CONTRACT_NAME, "FlexVerifier")
        for e in load_artifact(name)["abi"]
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
            return ContractError(f"the contract reverted with {entry['name']}", **found)
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
def rpc(**fields: Any) -> Iterator[None]:
    """Turns a lost node into ChainUnavailableError and a revert into its typed error; a
    refusal becomes TransactionRejectedError with ``fields`` (say, the sender)."""
    try:
        with reachable():
            yield
    except (ContractLogicError, Web3RPCError) as exc:
        if _is_revert(exc):
            raise decode_revert(_revert_data(exc)) from exc
        raise TransactionRejectedError(f"the node refused the request: {exc}", **fields) from exc


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
    receipt = send(w3, sender, {"data": "0x" + data.hex(), "value": 0})
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
    receipt = send(w3, sender, {"to": contract.address, "data": data, "value": value_wei})
    return tx_result(receipt, market=market)


def call_artifact(
    *, w3: Web3, name: str, address: str, function: str, args: Sequence[Any] = ()
) -> Any:
    """Reads ``function`` of a deployed ``name`` contract."""
    contract = w3.eth.contract(address=to_checksum_address(address), abi=load_artifact(name)["abi"])
    with rpc():
        return getattr(contract.functions, function)(*args).call()


def tx_result(receipt: Any, *, market: str | None) -> TxResult:
    return TxResult(
        tx_hash="0x" + bytes(receipt["transactionHash"]).hex(),
        block_number=receipt["blockNumber"],
        block_hash="0x" + bytes(receipt["blockHash"]).hex(),
        gas_used=receipt["gasUsed"],
        effective_gas_price_wei=receipt["effectiveGasPrice"],
        events=tuple(ev.decode_logs(receipt["logs"], address=market)),
    )


def struct_of(components: Sequence[Mapping[str, Any]], values: Sequence[Any]) -> dict[str, Any]:
    """An ABI tuple as keyword arguments of the matching record (snake_case names)."""
    return {
        snake_case(c["name"]): to_python(v, c["type"], c.get("internalType"))
        for c, v in zip(components, values, strict=True)
    }


@dataclass(frozen=True)
class AbiFunction:
    """One function of a contract's ABI, its calls encoded and its answers decoded with
    eth_abi. A web3 contract function looks itself up among the whole ABI on every call
    (hashing each entry's signature again: some fifty keccaks for FlexMarket), which costs
    more than the node takes to answer; this is done once, here."""

    selector: bytes
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    parsed_outputs: tuple[ABIType, ...]

    @classmethod
    def of(cls, entry: Mapping[str, Any]) -> AbiFunction:
        outputs = tuple(get_abi_output_types(entry))
        return cls(
            selector=function_abi_to_4byte_selector(entry),
            inputs=tuple(get_abi_input_types(entry)),
            outputs=outputs,
            parsed_outputs=tuple(parse_abi_type(t) for t in outputs),
        )

    def encode(self, args: Sequence[Any]) -> bytes:
        return self.selector + abi_encode(self.inputs, args)

    def decode(self, data: bytes) -> Any:
        """The call's answer as web3 gives it: addresses checksummed, a lone output bare."""
        decoded = abi_decode(self.outputs, data)
        values = tuple(map(_checksummed, decoded, self.parsed_outputs))
        return values[0] if len(values) == 1 else values


def abi_functions(abi: Sequence[Mapping[str, Any]]) -> dict[str, AbiFunction]:
    """Each function of ``abi`` by name (FLEX's contracts overload none)."""
    return {e["name"]: AbiFunction.of(e) for e in abi if e["type"] == "function"}


def _checksummed(value: Any, abi_type: ABIType) -> Any:
    if abi_type.is_array:
        return tuple(_checksummed(v, abi_type.item_type) for v in value)
    if isinstance(abi_type, TupleType):
        return tuple(_checksummed(v, t) for v, t in zip(value, abi_type.components, strict=True))
    if isinstance(abi_type, BasicType) and abi_type.base == "address":
        return checksum_address(value)
    return value


@dataclass(frozen=True)
class PendingTx:
    """A signed transaction the node has taken; ``receipt`` waits until it is mined.
    ``mined``: its receipt, when the node answered the send with it (submit's ``wait``)."""

    w3: Web3
    tx: Mapping[str, Any]
    tx_hash: bytes
    mined: Any = None

    def receipt(self, *, timeout: float = RECEIPT_TIMEOUT_SECONDS) -> Any:
        """The receipt once mined; a transaction that reverted there is replayed with
        eth_call to raise why. ChainUnavailableError when it is not mined in ``timeout``.

        Asked at once, then again after RECEIPT_POLL_S, each wait twice the one before:
        a node that mines as transactions arrive (a development chain, a rollup's
        sequencer) has it within milliseconds, and is asked within milliseconds; a chain
        of 12-second blocks is asked twice a second, not twenty times."""
        deadline = time.monotonic() + timeout
        delay, most = RECEIPT_POLL_S
        receipt = self.mined
        with rpc(sender=self.tx["from"]):
            while receipt is None and (receipt := self._mined()) is None:
                if time.monotonic() + delay > deadline:
                    raise ChainUnavailableError(
                        "transaction was not mined in time",
                        tx_hash="0x" + bytes(self.tx_hash).hex(),
                        timeout_s=timeout,
                    )
                time.sleep(delay)
                delay = min(2 * delay, most)
            if receipt["status"] != 1:
                _raise_mined_revert(self.w3, self.tx, receipt)
        return receipt

    def _mined(self) -> Any:
        try:
            return self.w3.eth.get_transaction_receipt(self.tx_hash)
        except (TransactionNotFound, TransactionIndexingInProgress):
            return None


def submit(
    w3: Web3,
    sender: LocalAccount,
    call: dict[str, Any],
    *,
    sending: contextlib.AbstractContextManager[Any] | None = None,
    wait: bool = False,
) -> PendingTx:
    """Estimates, signs with ``sender``'s key and hands the transaction to the node, without
    waiting for it to be mined: the next transaction from ``sender`` may follow at once.

    Taking the nonce and sending are done one transaction of ``sender`` at a time: under
    ``sending`` (say, a lock the processes signing with the same key share) and this
    process's lock for it, taken for those two alone; without ``sending``, under this
    process's lock taken before the transaction is priced, so that the nonce is asked in the
    same request as the rest (_price). A revert found by the estimate raises its typed error
    before anything is sent.

    With ``wait`` (the caller waits for the receipt next) and no ``sending``, the node is
    asked to answer with the receipt once the transaction is mined, where it can
    (_send_with_fresh_nonce): this process's next transaction from ``sender`` then waits for
    that one to be mined. A lock other processes wait on is never held that long.
    """
    tx: dict[str, Any] = {"from": sender.address, **call}
    with rpc(sender=sender.address):
        if sending is None:
            with _nonce_lock(sender.address):
                nonce = _price(w3, tx, nonce_of=sender.address)
                tx_hash, mined = _send_with_fresh_nonce(w3, sender, tx, sync=wait, nonce=nonce)
        else:
            _price(w3, tx)
            with _nonce_lock(sender.address), sending:
                tx_hash, mined = _send_with_fresh_nonce(w3, sender, tx)
    return PendingTx(w3=w3, tx=tx, tx_hash=tx_hash, mined=mined)


def _price(w3: Web3, tx: dict[str, Any], *, nonce_of: str | None = None) -> int | None:
    """Sets ``tx``'s chain, gas and fees from the node's tip, its gas estimate and the latest
    block's base fee, asked at once (chain.node.at_once) with, given ``nonce_of``, that
    account's pending nonce, which is returned. The estimate runs against the pending block:
    its time is the one the transaction will run at, so a deadline that has passed by the
    chain's clock has passed for the estimate too, and a revert raises its error."""
    reads = [
        lambda: w3.eth.max_priority_fee,
        lambda: w3.eth.estimate_gas(tx, "pending"),  # type: ignore[arg-type]
        lambda: w3.eth.get_block("latest"),
    ]
    if nonce_of is not None:
        reads.append(lambda: w3.eth.get_transaction_count(nonce_of, "pending"))  # type: ignore[arg-type]
    tip, estimate, block, *nonce = at_once(w3, *reads)
    margin = max(estimate * GAS_MARGIN_PERCENT // 100, GAS_MARGIN_MIN)
    tx.update(
        chainId=chain_id(w3),
        gas=min(estimate + margin, MAX_TX_GAS),
        maxPriorityFeePerGas=tip,
        maxFeePerGas=fee_cap(base_fee_wei=block.get("baseFeePerGas", 0), tip_wei=tip),
    )
    return nonce[0] if nonce else None


def send(
    w3: Web3,
    sender: LocalAccount,
    call: dict[str, Any],
    *,
    receipt_timeout: float = RECEIPT_TIMEOUT_SECONDS,
) -> Any:
    """Submits the transaction (see submit) and waits for its receipt (PendingTx.receipt)."""
    return submit(w3, sender, call, wait=True).receipt(timeout=receipt_timeout)


# How nodes say a nonce was taken: already mined (too low), or sent and still waiting in the
# pool (a "replacement" that pays no more; this very transaction: geth "already known",
# Anvil "already imported").
NONCE_TAKEN = ("nonce", "already known", "already imported", "replacement transaction")


def _send_with_fresh_nonce(
    w3: Web3,
    sender: LocalAccount,
    tx: dict[str, Any],
    *,
    sync: bool = False,
    nonce: int | None = None,
) -> tuple[bytes, Any]:
    """Signs with the node's pending nonce (``nonce``, when just asked under this process's
    lock for ``sender``) and sends; if another signer of the same key took that nonce
    meanwhile, takes the next one (a few times) instead of failing. When what took it is this
    very transaction (another process of the same key sent the same call with the same nonce
    and fees a moment first), that one is the one to wait for: sending the call again under
    the next nonce would run it twice.

    The transaction's hash, and with ``sync`` its receipt where the node sends it with
    SEND_SYNC: one request instead of a send and asks until it is mined. A node without that
    method is sent the plain way, from then on; one that takes the transaction but does not
    see it mined within its own wait leaves it to PendingTx.receipt (receipt None)."""
    for attempt in range(NONCE_ATTEMPTS):
        if attempt or nonce is None:
            nonce = w3.eth.get_transaction_count(sender.address, "pending")
        tx["nonce"] = nonce
        signed = sender.sign_transaction(tx)
        try:
            if sync and _sends_sync(w3):
                try:
                    return signed.hash, w3.eth.send_raw_transaction_sync(signed.raw_transaction)
                except (Web3RPCError, *UNREACHABLE) as exc:
                    # Refused, or taken and its answer lost or timed out: what the node holds
                    # tells which (a lost node raises again here).
                    if not method_missing(exc):
                        if _node_has(w3, signed.hash):
                            return signed.hash, None
                        raise
                    _SYNC_MISSING.add(str(w3.provider.endpoint_uri))  # type: ignore[attr-defined]
            return w3.eth.send_raw_transaction(signed.raw_transaction), None
        except Web3RPCError as exc:
            clash = any(s in str(exc).lower() for s in NONCE_TAKEN)
            if clash and _node_has(w3, signed.hash):
                return signed.hash, None
            if not clash or attempt == NONCE_ATTEMPTS - 1:
                raise TransactionRejectedError(
                    f"the node refused the transaction: {exc}", sender=sender.address
                ) from exc
    raise AssertionError("unreachable")  # pragma: no cover


# The nodes (by URL) this process found without SEND_SYNC.
_SYNC_MISSING: set[str] = set()


def _sends_sync(w3: Web3) -> bool:
    """Whether ``w3`` has SEND_SYNC (chain.node.client adds it) and its node was not found
    without it."""
    return (
        hasattr(w3.eth, "send_raw_transaction_sync")
        and str(w3.provider.endpoint_uri) not in _SYNC_MISSING  # type: ignore[attr-defined]
    )


def _node_has(w3: Web3, tx_hash: bytes) -> bool:
    """Whether the node holds transaction ``tx_hash``, mined or in its pool."""
    try:
        w3.eth.get_transaction(tx_hash)
    except TransactionNotFound:
        return False
    return True


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


def transfer_eth(
    *,
    w3: Web3,
    sender: LocalAccount,
    to: str,
    value_wei: int,
    sending: contextlib.AbstractContextManager[Any] | None = None,
) -> str:
    """Sends ``value_wei`` of plain ETH (e.g. gas money for a new device); returns the tx hash.
    ``sending`` as in submit."""
    call = {"to": to_checksum_address(to), "value": value_wei}
    receipt = submit(w3, sender, call, sending=sending, wait=True).receipt()
    return "0x" + bytes(receipt["transactionHash"]).hex()
