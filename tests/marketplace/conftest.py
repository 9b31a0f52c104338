"""Marketplace fixtures: the contract deployed on the session's chain, wired into settings."""

from __future__ import annotations

import pytest

from tests.marketplace.buyers import make_buyer
from tests.marketplace.test_admin import task_run_to_the_end


@pytest.fixture(autouse=True)
def _platform_chain(platform_settings):
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
