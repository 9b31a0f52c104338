"""The binary Merkle tree over a model's chunks that its ID commits to (docs/verifiable.md).

Leaves are ``keccak256(0x00 ‖ chunk)``, internal nodes ``keccak256(0x01 ‖ left ‖ right)``;
the tree is padded to a power of two with the empty hash ``bytes32(0)`` (and subtrees of
padding only with their own hash), so a proof is the ``log2(P)`` siblings from the leaf up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

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


def multiproof_in(tree: Sequence[Sequence[bytes]], indexes: Iterable[int]) -> list[bytes]:
    """One proof for the leaves at ``indexes`` at once: level by level from the leaves up,
    the sibling of each node on their paths that is neither on another of the paths nor
    padding, in position order. Empty for every leaf of a tree; for k leaves of P about
    k·log2(P/k) hashes, where k single proofs take k·log2(P)."""
    known = sorted(set(indexes))
    if not known or not 0 <= known[0] <= known[-1] < len(tree[0]):
        raise IndexError(f"leaves {known[:1]}..{known[-1:]} of {len(tree[0])}")
    hashes = []
    for level in tree[:-1]:
        have = set(known)
        hashes += [level[p ^ 1] for p in known if p ^ 1 not in have and p ^ 1 < len(level)]
        known = sorted({p >> 1 for p in known})
    return hashes


def multiproof_size(leaf_count: int, indexes: Iterable[int]) -> int:
    """How many hashes ``multiproof_in`` gives for ``indexes`` of ``leaf_count`` leaves."""
    known, width, size = sorted(set(indexes)), leaf_count, 0
    for _ in range(depth(leaf_count)):
        have = set(known)
        size += sum(p ^ 1 not in have and p ^ 1 < width for p in known)
        known, width = sorted({p >> 1 for p in known}), (width + 1) // 2
    return size


def multiproof_levels(
    leaf_count: int, leaves: Mapping[int, bytes], hashes: Sequence[bytes]
) -> list[dict[int, bytes]]:
    """What ``leaves`` (position: leaf hash) and their ``multiproof_in`` ``hashes`` make of
    a tree of ``leaf_count`` leaves: each level's nodes on the leaves' paths and their
    siblings, by position, leaves first, the root alone (at 0) last. A leaf's proof is then
    its path's siblings, ``[levels[h][(index >> h) ^ 1] for h in range(depth)]``. ValueError
    when ``hashes`` are not as many as the positions take (multiproof_size)."""
    if not leaves or not all(0 <= p < leaf_count for p in leaves):
        raise ValueError(f"leaves at {sorted(leaves)[:4]} of a tree of {leaf_count}")
    given, width, level = iter(hashes), leaf_count, dict(leaves)
    out: list[dict[int, bytes]] = []
    for height in range(depth(leaf_count)):
        parents = sorted({p >> 1 for p in level})
        for p in sorted(level):
            if (sibling := p ^ 1) not in level:
                level[sibling] = next(given, None) if sibling < width else _EMPTIES[height]
                if level[sibling] is None:
                    raise ValueError(f"{len(hashes)} proof hashes, too few for the leaves")
        out.append(level)
        level = {q: node(level[2 * q], level[2 * q + 1]) for q in parents}
        width = (width + 1) // 2
    if next(given, None) is not None:
        raise ValueError(f"{len(hashes)} proof hashes, too many for the leaves")
    out.append(level)
    return out


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
