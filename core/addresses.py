"""Ethereum addresses in the checksummed form FLEX shows and compares them in."""

from __future__ import annotations

import functools

from eth_utils import to_checksum_address

# Checksumming costs a keccak (tens of microseconds), and a process meets the same few
# addresses again and again (its task's devices, the contract) in every event, report and
# stored model it reads: each is converted once. Bounded, so that a stream of new addresses
# holds no more than this many.
checksum_address = functools.lru_cache(maxsize=16384)(to_checksum_address)
