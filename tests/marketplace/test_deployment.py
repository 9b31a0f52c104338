"""The platform's recorded deployment: confirmed against the chain, and a changed record is
read again at once, however recently the old one was confirmed."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command
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


@pytest.mark.parametrize("given", ["-1", "0.5", "lots"])
def test_deploy_contract_refuses_a_minimum_price_that_is_not_whole_wei(platform_settings, given):
    path = platform_settings.FLEX_DEPLOYMENT_FILE
    path.unlink(missing_ok=True)

    with pytest.raises(CommandError, match="expected a whole number of wei, 0 or more"):
        call_command("deploy_contract", "--force", f"--min-trainer-price-wei={given}")

    assert not path.exists()  # nothing deployed, nothing recorded
