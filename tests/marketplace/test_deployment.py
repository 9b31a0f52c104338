"""The platform's recorded deployment: confirmed against the chain, and a changed record is
read again at once, however recently the old one was confirmed."""

from __future__ import annotations

from eth_account import Account

from marketplace import contract
from marketplace.contract import Deployment, deployment_load, deployment_save


def test_a_recorded_deployment_is_read_again_as_soon_as_it_changes(
    platform_settings, platform_market
):
    path = platform_settings.FLEX_DEPLOYMENT_FILE
    chain_id = contract.chain_id()
    deployed = Deployment(chain_id=chain_id, address=platform_market.address, block=0)
    deployment_save(deployed, path)
    assert deployment_load(path) == deployed
    assert deployment_load(path) == deployed  # confirmed: kept

    # Redeployed elsewhere (here: an address with no code) or on another chain: the new
    # record is what counts, at once.
    nowhere = Deployment(chain_id=chain_id, address=Account.create().address, block=0)
    deployment_save(nowhere, path)
    assert deployment_load(path) is None
    deployment_save(Deployment(chain_id=chain_id + 1, address=deployed.address, block=0), path)
    assert deployment_load(path) is None
    deployment_save(deployed, path)
    assert deployment_load(path) == deployed
    path.unlink()
    assert deployment_load(path) is None
