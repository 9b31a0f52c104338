"""Marketplace fixtures: the contract deployed on the session's chain, wired into settings."""

from __future__ import annotations

import pytest

from tests.marketplace.buyers import make_buyer
from tests.marketplace.test_admin import task_run_to_the_end


@pytest.fixture(autouse=True)
def _platform_chain(platform_settings, chain_rewound):
    """Every test here runs against the session's contract and leaves the chain as it found
    it, its clock included: a test that mines past a deadline would otherwise leave the
    wall-clock deadlines of the tests after it (a task form's bidding end, a round's wait) in
    the chain's past."""
    return platform_settings


@pytest.fixture
def alice(platform_settings):
    return make_buyer("alice")


@pytest.fixture
def bob(platform_settings):
    return make_buyer("bob")


@pytest.fixture
def finished(alice, platform_market, w3):
    """Alice's task, run to the end on chain and mirrored by chain sync."""
    with task_run_to_the_end(platform_market, w3, buyer=alice) as rows:
        yield rows
