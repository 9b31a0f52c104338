"""Thousands of FlexMarket calls on a local Anvil at once, for benches that need them only to
set up what they measure: sent from impersonated accounts with automine off, mined together.

The transactions that a bench measures still go one by one through chain.client; this is
for the set-up around them (registrations, bids, a round's submissions), whose gasUsed is
the same whichever block they land in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from web3 import Web3

from chain.client import FlexMarket
from chain.errors import ChainUnavailableError, ContractError

# JSON-RPC requests per HTTP round-trip.
REQUESTS_PER_POST = 200
# Blocks mined for one batch without a new receipt before giving up: a transaction the node
# keeps pending (a nonce gap, a fee it will not take) never lands.
IDLE_BLOCKS = 3


@dataclass(frozen=True)
class Call:
    """One FlexMarket function call from ``sender`` (any address: it is impersonated)."""

    sender: str
    function: str
    args: tuple[Any, ...]
    value_wei: int = 0
    # A fixed limit instead of an estimate per call; a block takes as many as its limit holds.
    gas: int = 300_000


def _rpc(w3: Web3, method: str, params: list[Any]) -> Any:
    response = w3.provider.make_request(method, params)  # type: ignore[arg-type]
    if "error" in response:
        raise ChainUnavailableError(f"{method} failed: {response['error']}", method=method)
    return response["result"]


def _rpc_many(w3: Web3, requests: Sequence[tuple[str, list[Any]]]) -> Iterator[Any]:
    """Each request's result, in order; REQUESTS_PER_POST to an HTTP round-trip."""
    for start in range(0, len(requests), REQUESTS_PER_POST):
        chunk = requests[start : start + REQUESTS_PER_POST]
        for (method, _), response in zip(
            chunk, w3.provider.make_batch_request(list(chunk)), strict=True
        ):
            if "error" in response:
                raise ChainUnavailableError(f"{method} failed: {response['error']}", method=method)
            yield response["result"]


def transact_many(market: FlexMarket, calls: Sequence[Call]) -> list[int]:
    """Sends every call in order (one sender's calls keep their order), mines blocks until
    all are in, and returns each call's gasUsed. Raises ContractError naming the first call
    that reverted."""
    if not calls:
        return []
    w3 = market.w3
    contract = w3.eth.contract(address=market.address, abi=market.abi)
    senders = sorted({Web3.to_checksum_address(c.sender) for c in calls})
    # Nonces are set here: the node may take one post's requests in any order.
    counts = _rpc_many(w3, [("eth_getTransactionCount", [s, "pending"]) for s in senders])
    nonces = {sender: int(count, 16) for sender, count in zip(senders, counts, strict=True)}
    txs = []
    for c in calls:
        sender = Web3.to_checksum_address(c.sender)
        txs.append(
            {
                "from": sender,
                "to": market.address,
                "data": contract.encode_abi(c.function, args=list(c.args)),
                "value": hex(c.value_wei),
                "gas": hex(c.gas),
                "nonce": hex(nonces[sender]),
            }
        )
        nonces[sender] += 1
    _rpc(w3, "anvil_autoImpersonateAccount", [True])
    _rpc(w3, "evm_setAutomine", [False])
    try:
        hashes = list(_rpc_many(w3, [("eth_sendTransaction", [tx]) for tx in txs]))
        receipts: dict[str, Any] = {}
        idle = 0
        while len(receipts) < len(hashes):
            _rpc(w3, "evm_mine", [])
            missing = [h for h in hashes if h not in receipts]
            found = _rpc_many(w3, [("eth_getTransactionReceipt", [h]) for h in missing])
            new = {h: r for h, r in zip(missing, found, strict=True) if r is not None}
            receipts.update(new)
            idle = 0 if new else idle + 1
            if idle == IDLE_BLOCKS:
                raise ChainUnavailableError(
                    f"{len(hashes) - len(receipts)} of {len(hashes)} transactions were not mined"
                )
    finally:
        _rpc(w3, "evm_setAutomine", [True])
        _rpc(w3, "anvil_autoImpersonateAccount", [False])
    gas = []
    for call, tx_hash in zip(calls, hashes, strict=True):
        receipt = receipts[tx_hash]
        if int(receipt["status"], 16) != 1:
            raise ContractError(
                f"{call.function} from {call.sender} reverted",
                tx_hash=tx_hash,
                gas_used=int(receipt["gasUsed"], 16),
            )
        gas.append(int(receipt["gasUsed"], 16))
    return gas
