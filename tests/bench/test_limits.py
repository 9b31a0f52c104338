"""The contract's limits as the benchmarks know them, and the end-to-end bench refusing a run
the contract would refuse, before it starts anything."""

from __future__ import annotations

import pytest

from bench import MAX_BIDS, MAX_ROUNDS, MAX_TRAINERS, e2e
from chain.client import FlexMarket


def test_the_benchmarks_limits_are_the_deployed_contracts(platform_market: FlexMarket):
    limits = platform_market.limits()
    assert (
        limits.max_bids,
        limits.max_trainers,
        limits.max_rounds,
    ) == (MAX_BIDS, MAX_TRAINERS, MAX_ROUNDS)


@pytest.mark.parametrize(
    ("rounds", "message"),
    [
        (MAX_ROUNDS + 1, f"--rounds must be at most the contract's {MAX_ROUNDS}"),
        (1, "--rounds must be at least 2"),
    ],
)
def test_e2e_refuses_a_round_count_the_contract_would_not_take(rounds, message, capsys):
    with pytest.raises(SystemExit) as exc:
        e2e.main(["--rounds", str(rounds)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
