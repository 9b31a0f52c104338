"""Marketplace fixtures: the contract deployed on the session's chain, wired into settings."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _platform_chain(platform_settings):
    return platform_settings
