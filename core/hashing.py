"""keccak256, the hash FLEX's model IDs, Merkle trees, spec hashes and value digests are made of.

eth_hash's own choice (eth_hash.auto) takes pycryptodome when both backends are installed;
pysha3's C code (safe-pysha3) hashes the short inputs of a Merkle tree about five times
faster, and a round's checks hash thousands of them."""

from eth_hash import Keccak256
from eth_hash.backends.pysha3 import backend

keccak = Keccak256(backend)
