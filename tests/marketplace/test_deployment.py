"""The platform's recorded deployment: confirmed against the chain, a changed record read again
at once, however recently the old one was confirmed, and a record of a contract built from
other sources than this checkout's refused by name."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command
from eth_account import Account

from chain.build import compiler_metadata, load_artifact
from chain.client import FlexMarket
from chain.fraud import FlexVerifier
from chain.launcher import dev_accounts
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


def test_a_recorded_market_of_these_sources_is_kept(platform_settings, platform_market, capsys):
    path = platform_settings.FLEX_DEPLOYMENT_FILE
    recorded = Deployment(chain_id=contract.chain_id(), address=platform_market.address, block=0)
    deployment_save(recorded, path)

    call_command("deploy_contract")

    assert f"FlexMarket already deployed at {platform_market.address}" in capsys.readouterr().out
    assert deployment_load(path) == recorded


def test_a_recorded_contract_built_from_other_sources_is_refused_by_name(platform_settings, w3):
    """A var/ made before the contract changed: the platform would speak the new ABI to the
    old code. Here the record names code of other sources outright (the verifier's)."""
    path = platform_settings.FLEX_DEPLOYMENT_FILE
    other = FlexVerifier.deploy(w3=w3, sender=dev_accounts(1)[0]).address
    recorded = Deployment(chain_id=contract.chain_id(), address=other, block=0)
    deployment_save(recorded, path)

    assert not FlexMarket(w3=w3, address=other).built_from_artefact()
    with pytest.raises(CommandError) as refused:
        call_command("deploy_contract")

    assert str(refused.value) == (
        f"{path} names the FlexMarket at {other} (chain {recorded.chain_id}), built from other "
        "sources than contracts/build/FlexMarket.json: the contract has changed since it was "
        "deployed. `make clean` starts the local platform afresh; --force deploys a new "
        "contract and records it instead"
    )
    assert deployment_load(path) == recorded  # nothing deployed, the record left as it was


def test_the_compiler_metadata_ends_the_code_and_tells_builds_apart():
    market = load_artifact("FlexMarket")["deployedBytecode"]
    verifier = load_artifact("FlexVerifier")["deployedBytecode"]

    ours = compiler_metadata(market)
    assert ours.startswith(bytes.fromhex("a264697066735822"))  # {"ipfs": <34 bytes>, ...}
    assert market.endswith(ours.hex())
    assert compiler_metadata(verifier) not in (b"", ours)
    for code in (b"", b"\x00", b"\x60\x00\x00\xff"):  # none, or a length longer than the code
        assert compiler_metadata(code) == b""
