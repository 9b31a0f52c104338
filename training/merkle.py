"""The binary Merkle tree over a model's chunks that its ID commits to (docs/verifiable.md).

Leaves are ``keccak256(0x00 ‖ chunk)``, internal nodes ``keccak256(0x01 ‖ left ‖ right)``;
the tree is padded to a power of two with the empty hash ``bytes32(0)`` (and subtrees of
padding only with their own hash), so a proof is the ``log2(P)`` siblings from the leaf up.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.hashing import keccak

LEAF = b"\x00"
NODE = b"\x01"
EMPTY = bytes(32)


def leaf(chunk: bytes | memoryview) -> bytes:
    """The leaf hash of one chunk's bytes."""
    return keccak(LEAF + bytes(chunk))


def node(left: bytes, right: bytes) -> bytes:
    """The hash of an internal node from its two children."""
    return keccak(NODE + left + right)


# The hash of an all-padding subtree at each height: the same in every tree.
_EMPTIES = [EMPTY]
for _ in range(64):
    _EMPTIES.append(node(_EMPTIES[-1], _EMPTIES[-1]))


def depth(leaf_count: int) -> int:
    """``log2(P)``: levels above the leaves, with ``P`` the least power of two >= leaf_count."""
    if leaf_count < 1:
        raise ValueError(f"a tree needs at least one leaf, got {leaf_count}")
    return (leaf_count - 1).bit_length()


def levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the tree, leaves first and the root alone last; padding is implicit
    (a missing right child is the empty hash of its level)."""
    depth(len(leaves))  # at least one leaf
    level, out = list(leaves), []
    out.append(level)
    while len(level) > 1:
        if len(level) % 2:
            level = [*level, _EMPTIES[len(out) - 1]]
        level = [node(level[i], level[i + 1]) for i in range(0, len(level), 2)]
        out.append(level)
    return out


def root(leaves: Sequence[bytes]) -> bytes:
    """The Merkle root of ``leaves`` (the leaf itself when there is one)."""
    return levels(leaves)[-1][0]


def proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The sibling hashes from leaf ``index`` up to the root."""
    return proof_in(levels(leaves), index)


def proof_in(tree: Sequence[Sequence[bytes]], index: int) -> list[bytes]:
    """``proof`` from the tree's ``levels``, made once for every proof of a model."""
    if not 0 <= index < len(tree[0]):
        raise IndexError(f"leaf {index} of {len(tree[0])}")
    siblings = []
    for height, level in enumerate(tree[:-1]):
        sibling = index ^ 1
        siblings.append(level[sibling] if sibling < len(level) else _EMPTIES[height])
        index >>= 1
    return siblings


def verify(
    *, leaf_hash: bytes, index: int, siblings: Sequence[bytes], root_hash: bytes, leaf_count: int
) -> bool:
    """Whether ``leaf_hash`` sits at ``index`` of a tree of ``leaf_count`` leaves under
    ``root_hash``, by the path ``siblings``."""
    if not 0 <= index < leaf_count or len(siblings) != depth(leaf_count):
        return False
    h = leaf_hash
    for j, sibling in enumerate(siblings):
        h = node(h, sibling) if not (index >> j) & 1 else node(sibling, h)
    return h == root_hash
