"""Benchmarks that write machine-readable results under var/bench/."""

# A part's exit status when it ran to the end and wrote its figures, but a figure missed its
# target (1 is a run that failed: no figures, or figures of a run that went wrong).
TARGET_MISSED = 2

# FlexMarket's limits (MAX_BIDS, MAX_TRAINERS, MAX_ROUNDS): the benchmarks meet them, and
# refuse sizes beyond them before starting anything. tests/bench holds them to the contract's.
MAX_BIDS, MAX_TRAINERS, MAX_ROUNDS = 1000, 128, 100


def verdict(ok: bool) -> int:
    """A finished part's exit status: 0 when every target was met, else TARGET_MISSED."""
    return 0 if ok else TARGET_MISSED
