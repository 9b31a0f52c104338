"""The text a device signs (EIP-191) to prove to the platform that it holds its key."""

from __future__ import annotations


def join_message(*, challenge: str, address: str) -> str:
    """What a device signs to prove to the platform that it holds the key of ``address``."""
    return f"FLEX device enrolment\nchallenge: {challenge}\naddress: {address}"


# How long a signed owner pass may be valid at most: a link is for looking, not for keeping.
OWNER_PASS_MAX_S = 24 * 3600


def owner_message(*, address: str, chain_id: int, contract: str, expires: int) -> str:
    """What a device signs to show its owner its own status (its page on the website, or
    `python -m worker status`): bound to one deployment, good until ``expires`` (unix time)."""
    return (
        f"FLEX device owner\naddress: {address}\ndeployment: {chain_id}/{contract}\n"
        f"expires: {expires}"
    )
