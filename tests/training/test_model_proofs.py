"""Merkle proofs of single chunks against a model ID, and the streaming check of a download."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from eth_utils import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.blobs import blob_of
from training import merkle
from training.errors import (
    BlobHeaderError,
    BlobTooLongError,
    BlobTruncatedError,
    ChunkMismatchError,
    ModelIdMismatchError,
)
from training.serialize import decode, model_id, read_header, verify_chunk
from training.verifier import BlobVerifier

Z0 = bytes(32)


def _leaves(count: int) -> list[bytes]:
    return [keccak(b"\x00" + i.to_bytes(4, "big")) for i in range(count)]


def test_tree_by_hand():
    a, b, c = _leaves(3)
    assert merkle.root([a]) == a
    node = merkle.node
    assert node(a, b) == keccak(b"\x01" + a + b)
    assert merkle.root([a, b]) == node(a, b)
    # Three leaves pad to four with the empty hash.
    assert merkle.root([a, b, c]) == node(node(a, b), node(c, Z0))
    assert merkle.proof([a, b, c], 2) == [Z0, node(a, b)]
    # Five pad to eight: the padding-only subtree is Z_1 = node(Z0, Z0).
    leaves = _leaves(5)
    z1 = node(Z0, Z0)
    assert merkle.root(leaves) == node(merkle.root(leaves[:4]), node(node(leaves[4], Z0), z1))
    assert merkle.proof(leaves, 4) == [Z0, z1, merkle.root(leaves[:4])]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 70), st.data())
def test_property_every_leaf_proves_and_nothing_else_does(count, data):
    leaves = _leaves(count)
    root = merkle.root(leaves)
    index = data.draw(st.integers(0, count - 1))
    proof = merkle.proof(leaves, index)
    assert len(proof) == merkle.depth(count)
    ok = {"leaf_hash": leaves[index], "index": index, "siblings": proof, "root_hash": root}
    assert merkle.verify(**ok, leaf_count=count)
    assert not merkle.verify(**{**ok, "leaf_hash": keccak(b"other")}, leaf_count=count)
    if count > 1:
        other = (index + 1) % count
        assert not merkle.verify(**{**ok, "index": other}, leaf_count=count)
        bent = [*proof]
        bent[data.draw(st.integers(0, len(proof) - 1))] = keccak(b"bent")
        assert not merkle.verify(**{**ok, "siblings": bent}, leaf_count=count)
        assert not merkle.verify(**{**ok, "siblings": proof[:-1]}, leaf_count=count)


def test_a_proof_past_the_last_leaf_is_refused():
    # Position 3 of a 3-leaf tree holds the empty hash; it is not a chunk.
    leaves = _leaves(3)
    siblings = [leaves[2], merkle.node(leaves[0], leaves[1])]
    args = {"leaf_hash": Z0, "index": 3, "siblings": siblings, "root_hash": merkle.root(leaves)}
    assert not merkle.verify(**args, leaf_count=3)
    assert merkle.verify(**args, leaf_count=4)  # the same path, were it a leaf


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 70), st.data())
def test_property_one_proof_for_many_leaves_makes_the_root_and_each_leafs_own_proof(count, data):
    leaves = _leaves(count)
    tree = merkle.levels(leaves)
    asked = data.draw(st.lists(st.integers(0, count - 1), min_size=1, max_size=count))
    hashes = merkle.multiproof_in(tree, asked)
    assert len(hashes) == merkle.multiproof_size(count, asked)
    # Never more than the single proofs' hashes, and none when every leaf is asked for.
    assert len(hashes) <= len(set(asked)) * merkle.depth(count)
    assert merkle.multiproof_in(tree, range(count)) == []
    made = merkle.multiproof_levels(count, {i: leaves[i] for i in asked}, hashes)
    assert made[-1] == {0: merkle.root(leaves)}
    for i in asked:
        assert [made[h][(i >> h) ^ 1] for h in range(len(made) - 1)] == merkle.proof(leaves, i)
    if hashes:
        bent = [*hashes]
        bent[data.draw(st.integers(0, len(hashes) - 1))] = keccak(b"bent")
        made = merkle.multiproof_levels(count, {i: leaves[i] for i in asked}, bent)
        assert made[-1] != {0: merkle.root(leaves)}
        with pytest.raises(ValueError, match="too few"):
            merkle.multiproof_levels(count, {i: leaves[i] for i in asked}, hashes[:-1])
    with pytest.raises(ValueError, match="too many"):
        merkle.multiproof_levels(count, {i: leaves[i] for i in asked}, [*hashes, Z0])


BLOB = blob_of(
    [np.linspace(-1, 1, 1000, dtype=np.float32).reshape(40, 25), np.ones(30, np.float32)]
)


def test_every_chunk_of_a_model_proves_against_its_id():
    model = decode(BLOB)
    header = BLOB[: read_header(BLOB)[1]]
    assert model.header.leaf_count == 5  # 1030 values: 4 full chunks and one of 6
    for index in range(5):
        chunk, proof = model.chunk(index), model.proof(index)
        args = {"model_id": model.model_id, "header": header, "root": model.root}
        assert verify_chunk(**args, index=index, chunk=chunk, proof=proof)
        flipped = bytes([chunk[0] ^ 1]) + chunk[1:]
        assert not verify_chunk(**args, index=index, chunk=flipped, proof=proof)
        assert not verify_chunk(**args, index=index, chunk=chunk + bytes(4), proof=proof)
        at = {"index": index, "chunk": chunk, "proof": proof}
        assert not verify_chunk(**{**args, "root": keccak(b"x")}, **at)
        wrong_header = header[:50] + bytes([header[50] ^ 1]) + header[51:]
        assert not verify_chunk(**{**args, "header": wrong_header}, **at)
    assert model.chunk(4) == model.values[1][-6:].astype(">i4").tobytes()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, len(BLOB)), max_size=12))
def test_property_verifier_accepts_the_blob_in_any_pieces(cuts):
    verifier = BlobVerifier(expected_id=model_id(BLOB))
    points = sorted({0, len(BLOB), *cuts})
    for lo, hi in itertools.pairwise(points):
        verifier.feed(BLOB[lo:hi])
    assert verifier.finish() == model_id(BLOB)
    assert verifier.header == decode(BLOB).header


def test_verifier_refuses_another_model_before_any_value_arrives():
    other = blob_of([np.zeros((40, 25), np.float32), np.ones(30, np.float32)])
    values_start = read_header(other)[1] + 32 * 5
    verifier = BlobVerifier(expected_id=model_id(BLOB))
    with pytest.raises(ModelIdMismatchError):
        verifier.feed(other[:values_start])  # header and leaves only


def test_verifier_stops_at_the_first_bad_chunk():
    tampered = bytearray(BLOB)
    start = read_header(BLOB)[1] + 32 * 5
    tampered[start + 2 * 1024 + 7] ^= 1  # chunk 2
    tampered[start + 3 * 1024 + 7] ^= 1  # chunk 3
    verifier = BlobVerifier(expected_id=model_id(BLOB))
    verifier.feed(tampered[: start + 2 * 1024])  # chunks 0 and 1 are fine
    with pytest.raises(ChunkMismatchError) as exc:
        verifier.feed(tampered[start + 2 * 1024 : start + 3 * 1024])
    assert exc.value.index == 2


def test_verifier_refuses_short_long_and_malformed_streams():
    short = BlobVerifier(expected_id=model_id(BLOB))
    short.feed(BLOB[:-1])
    with pytest.raises(BlobTruncatedError):
        short.finish()
    with pytest.raises(BlobTruncatedError):
        BlobVerifier().finish()
    long = BlobVerifier()
    with pytest.raises(BlobTooLongError):
        long.feed(BLOB + b"\x00")
    with pytest.raises(BlobHeaderError, match="magic"):
        BlobVerifier().feed(b"FLEXMODL")
    assert BlobVerifier().feed(b"FLEX") is None  # a prefix of the magic waits for more
