"""The text a device signs (EIP-191) to prove to the platform that it holds its key."""

from __future__ import annotations


def join_message(*, challenge: str, address: str) -> str:
    """What a device signs to prove to the platform that it holds the key of ``address``."""
    return f"FLEX device enrolment\nchallenge: {challenge}\naddress: {address}"
