"""The gas bench's batched set-up on the real local chain: every call lands with the gas it
would use alone, a revert names its call, and the chain mines on its own again after."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from eth_account import Account
from eth_utils import keccak

from bench.batch import Call, transact_many
from chain.client import FlexMarket
from chain.errors import ContractError
from chain.events import DeviceClass, DeviceStatus
from chain.launcher import dev_accounts


@pytest.fixture
def market(platform_market: FlexMarket) -> Iterator[FlexMarket]:
    w3 = platform_market.w3
    snapshot = w3.provider.make_request("evm_snapshot", [])["result"]
    yield platform_market
    w3.provider.make_request("evm_revert", [snapshot])


def devices(n: int, tag: str) -> list[str]:
    return [Account.from_key(keccak(text=f"batch-{tag}-{i}")).address for i in range(n)]


def register(address: str) -> Call:
    registrar = dev_accounts(1)[0].address
    return Call(registrar, "registerDevice", (address, int(DeviceClass.CPU), False))


def test_every_call_lands_with_the_gas_it_uses_alone(market):
    registrar = dev_accounts(1)[0]
    batch = devices(30, "land")
    w3 = market.w3
    before = w3.provider.make_request("evm_snapshot", [])["result"]
    alone = [
        market.register_device(
            sender=registrar, device=d, device_class=DeviceClass.CPU, can_aggregate=False
        ).gas_used
        for d in batch
    ]
    w3.provider.make_request("evm_revert", [before])
    start = w3.eth.block_number

    gas = transact_many(market, [register(d) for d in batch])

    assert gas == alone
    assert all(market.device(device=d).status == DeviceStatus.ACTIVE for d in batch)
    # One registrar, thirty nonces in a row: mined together rather than a block each.
    assert w3.eth.block_number - start < 30


def test_a_revert_names_its_call_and_the_chain_mines_on_its_own_again(market):
    registrar = dev_accounts(1)[0]
    first, second = devices(2, "revert")

    with pytest.raises(ContractError, match="registerDevice") as exc:
        transact_many(market, [register(first), register(first)])

    assert exc.value.fields["tx_hash"].startswith("0x")
    # Automine is back: a normal transaction gets its receipt at once.
    result = market.register_device(
        sender=registrar, device=second, device_class=DeviceClass.CPU, can_aggregate=False
    )
    assert result.gas_used > 0
    assert market.device(device=second).status == DeviceStatus.ACTIVE
