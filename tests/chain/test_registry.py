"""Owner, registrar, platform minimum prices and the device registry."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_utils import keccak

from chain.client import FlexMarket
from chain.errors import (
    DeviceAlreadyRegisteredError,
    DeviceNotRegisteredError,
    DeviceRevokedError,
    NotOwnerError,
    NotRegistrarError,
    ZeroAddressError,
)
from chain.events import (
    DeviceClass,
    DeviceRegistered,
    DeviceRevoked,
    DeviceStatus,
    MinPricesChanged,
    OwnershipTransferred,
    RegistrarChanged,
    Role,
)
from tests.chain.conftest import MIN_AGGREGATOR_PRICE_WEI, MIN_TRAINER_PRICE_WEI, Accounts, Flow

ZERO = "0x" + "00" * 20


def test_deployer_is_owner_and_registrar_with_min_prices(market: FlexMarket, accounts: Accounts):
    assert market.owner() == accounts.owner.address
    assert market.registrar() == accounts.owner.address
    prices = market.min_prices()
    assert prices.min_trainer_price_wei == MIN_TRAINER_PRICE_WEI
    assert prices.min_aggregator_price_wei == MIN_AGGREGATOR_PRICE_WEI
    assert market.limits().max_trainers == 128


def test_deploy_emits_initial_state_events(market: FlexMarket, accounts: Accounts):
    chunk = next(market.scan(to_block=market.deploy_block))
    names = [type(e).__name__ for e in chunk.events]
    assert names == ["OwnershipTransferred", "RegistrarChanged", "MinPricesChanged"]
    assert chunk.events[0].new_owner == accounts.owner.address


def test_set_min_prices(market: FlexMarket, accounts: Accounts):
    result = market.set_min_prices(
        sender=accounts.owner, min_trainer_price_wei=5, min_aggregator_price_wei=7
    )
    event = result.first(MinPricesChanged)
    assert (event.min_trainer_price_wei, event.min_aggregator_price_wei) == (5, 7)
    assert market.min_prices().min_aggregator_price_wei == 7


def test_set_min_prices_rejects_non_owner(market: FlexMarket, accounts: Accounts):
    with pytest.raises(NotOwnerError) as exc:
        market.set_min_prices(
            sender=accounts.buyer, min_trainer_price_wei=5, min_aggregator_price_wei=7
        )
    assert exc.value.account == accounts.buyer.address
    assert exc.value.code == "not_owner"


def test_open_task_keeps_the_min_prices_it_was_created_with(
    market: FlexMarket, accounts: Accounts, flow: Flow
):
    task_id = flow.create_task()
    market.set_min_prices(
        sender=accounts.owner,
        min_trainer_price_wei=10 * MIN_TRAINER_PRICE_WEI,
        min_aggregator_price_wei=10 * MIN_AGGREGATOR_PRICE_WEI,
    )
    assert market.task(task_id=task_id).min_trainer_price_wei == MIN_TRAINER_PRICE_WEI
    flow.bid_trainer(task_id, accounts.trainers[0], MIN_TRAINER_PRICE_WEI)
    assert market.bids(task_id=task_id)[0].price_per_round_wei == MIN_TRAINER_PRICE_WEI


def test_set_registrar(market: FlexMarket, accounts: Accounts):
    result = market.set_registrar(sender=accounts.owner, registrar=accounts.outsider.address)
    event = result.first(RegistrarChanged)
    assert event.previous_registrar == accounts.owner.address
    assert event.new_registrar == accounts.outsider.address
    market.register_device(
        sender=accounts.outsider,
        device=accounts.unregistered.address,
        device_class=DeviceClass.JETSON,
        can_aggregate=False,
    )
    # The owner is no longer the registrar.
    with pytest.raises(NotRegistrarError):
        market.revoke_device(sender=accounts.owner, device=accounts.unregistered.address)


def test_set_registrar_rejects_non_owner_and_zero(market: FlexMarket, accounts: Accounts):
    with pytest.raises(NotOwnerError):
        market.set_registrar(sender=accounts.outsider, registrar=accounts.outsider.address)
    with pytest.raises(ZeroAddressError):
        market.set_registrar(sender=accounts.owner, registrar=ZERO)


def test_transfer_ownership(market: FlexMarket, accounts: Accounts):
    result = market.transfer_ownership(sender=accounts.owner, new_owner=accounts.outsider.address)
    assert result.first(OwnershipTransferred).new_owner == accounts.outsider.address
    assert market.owner() == accounts.outsider.address
    with pytest.raises(NotOwnerError):
        market.set_min_prices(
            sender=accounts.owner, min_trainer_price_wei=1, min_aggregator_price_wei=1
        )
    with pytest.raises(ZeroAddressError):
        market.transfer_ownership(sender=accounts.outsider, new_owner=ZERO)


def test_register_device(market: FlexMarket, accounts: Accounts):
    device = accounts.unregistered.address
    assert market.device(device=device).status == DeviceStatus.NONE
    result = market.register_device(
        sender=accounts.owner, device=device, device_class=DeviceClass.JETSON, can_aggregate=True
    )
    event = result.first(DeviceRegistered)
    assert (event.device, event.device_class, event.can_aggregate) == (
        device,
        DeviceClass.JETSON,
        True,
    )
    info = market.device(device=device)
    assert info.status == DeviceStatus.ACTIVE
    assert info.device_class == DeviceClass.JETSON
    assert info.can_aggregate is True


def test_a_registrar_sends_the_next_registration_before_the_first_is_mined(
    market: FlexMarket, accounts: Accounts
):
    devices = [Account.from_key(keccak(text=f"unmined-{i}")).address for i in range(3)]
    w3 = market.w3
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        pending = [
            market.register_device_submit(
                sender=accounts.owner, device=d, device_class=DeviceClass.GPU, can_aggregate=False
            )
            for d in devices
        ]
        # Handed to the node, none mined: nothing registered yet.
        assert {market.device(device=d).status for d in devices} == {DeviceStatus.NONE}
        w3.provider.make_request("evm_mine", [])
    finally:
        w3.provider.make_request("evm_setAutomine", [True])

    results = [p.result() for p in pending]

    assert [r.first(DeviceRegistered).device for r in results] == devices
    assert len({r.block_number for r in results}) == 1
    assert {market.device(device=d).status for d in devices} == {DeviceStatus.ACTIVE}


def test_register_device_rejects_non_registrar(market: FlexMarket, accounts: Accounts):
    with pytest.raises(NotRegistrarError) as exc:
        market.register_device(
            sender=accounts.outsider,
            device=accounts.outsider.address,
            device_class=DeviceClass.CPU,
            can_aggregate=False,
        )
    assert exc.value.account == accounts.outsider.address


def test_register_device_rejects_active_device_and_zero(market: FlexMarket, accounts: Accounts):
    with pytest.raises(DeviceAlreadyRegisteredError) as exc:
        market.register_device(
            sender=accounts.owner,
            device=accounts.trainers[0].address,
            device_class=DeviceClass.CPU,
            can_aggregate=False,
        )
    assert exc.value.device == accounts.trainers[0].address
    with pytest.raises(ZeroAddressError):
        market.register_device(
            sender=accounts.owner, device=ZERO, device_class=DeviceClass.CPU, can_aggregate=False
        )


def test_revoke_device(market: FlexMarket, accounts: Accounts):
    device = accounts.trainers[0].address
    result = market.revoke_device(sender=accounts.owner, device=device)
    assert result.first(DeviceRevoked).device == device
    assert market.device(device=device).status == DeviceStatus.REVOKED


def test_revoke_device_errors(market: FlexMarket, accounts: Accounts):
    with pytest.raises(NotRegistrarError):
        market.revoke_device(sender=accounts.buyer, device=accounts.trainers[0].address)
    with pytest.raises(DeviceNotRegisteredError) as exc:
        market.revoke_device(sender=accounts.owner, device=accounts.unregistered.address)
    assert exc.value.device == accounts.unregistered.address
    market.revoke_device(sender=accounts.owner, device=accounts.trainers[0].address)
    with pytest.raises(DeviceRevokedError):
        market.revoke_device(sender=accounts.owner, device=accounts.trainers[0].address)


def test_revoked_device_can_be_registered_again(market: FlexMarket, accounts: Accounts, flow: Flow):
    trainer = accounts.trainers[0]
    market.revoke_device(sender=accounts.owner, device=trainer.address)
    task_id = flow.create_task()
    with pytest.raises(DeviceRevokedError):
        flow.bid_trainer(task_id, trainer, MIN_TRAINER_PRICE_WEI)
    market.register_device(
        sender=accounts.owner,
        device=trainer.address,
        device_class=DeviceClass.GPU,
        can_aggregate=True,
    )
    market.place_bid(
        sender=trainer,
        task_id=task_id,
        price_per_round_wei=MIN_AGGREGATOR_PRICE_WEI,
        samples=0,
        role=Role.AGGREGATOR,
    )
    assert market.bids(task_id=task_id)[0].role == Role.AGGREGATOR
