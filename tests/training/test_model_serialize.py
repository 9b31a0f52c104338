"""Canonical model bytes and IDs: deterministic everywhere, and every tampering refused."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from eth_utils import keccak
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from training.errors import (
    BlobDtypeError,
    BlobHeaderError,
    BlobTruncatedError,
    ModelBlobError,
    ModelIdMismatchError,
)
from training.serialize import DTYPES, decode, dumps, id_hex, loads, model_id, parse_id

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_CODE = (
    "import numpy as np\n"
    "sample = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1.5, -2.0]),"
    " np.zeros((0, 4), dtype=np.int16), np.array(7, dtype=np.uint8)]\n"
)
# Pinned: the bytes of format version 1 must never change, or on-chain IDs stop verifying.
SAMPLE_ID = "0x75e5d8162f85c27d924c015448d64ea7b1a32341508fe53e596d2ccefb4426e8"


def sample() -> list[np.ndarray]:
    scope: dict = {}
    exec(SAMPLE_CODE, scope)
    return scope["sample"]


def test_layout_of_a_tiny_blob():
    blob = dumps([np.array([1.0, 2.0], dtype=np.float32)], names=["w"])
    assert blob == (
        b"FLEXMODL"
        + struct.pack("<HI", 1, 1)
        + struct.pack("<H", 1)
        + b"w"
        + b"f4"
        + bytes([1])
        + struct.pack("<Q", 2)
        + np.array([1.0, 2.0], dtype="<f4").tobytes()
    )


def test_model_id_is_keccak256_of_the_blob():
    blob = dumps(sample())
    assert model_id(blob) == keccak(blob)
    assert len(model_id(blob)) == 32


def test_sample_id_is_pinned():
    assert id_hex(model_id(dumps(sample()))) == SAMPLE_ID


def test_same_id_in_a_fresh_process():
    code = (
        SAMPLE_CODE
        + "from training.serialize import dumps, model_id, id_hex\n"
        + "print(id_hex(model_id(dumps(sample))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == SAMPLE_ID


def test_layout_in_memory_does_not_change_the_bytes():
    weights = sample()
    twisted = [
        np.asfortranarray(weights[0]),
        weights[1].astype(">f8"),
        weights[2],
        weights[3],
    ]
    strided = np.arange(12, dtype=np.float32).reshape(2, 6)[:, ::2]
    assert dumps(twisted) == dumps(weights)
    assert dumps([strided]) == dumps([np.ascontiguousarray(strided)])


def test_round_trip_keeps_names_dtypes_shapes_values():
    weights = sample()
    blob = dumps(weights, names=["a", "b", "c", "d"])
    decoded = decode(blob, expected_id=model_id(blob))
    assert decoded.names == ["a", "b", "c", "d"]
    for got, want in zip(decoded.weights, weights, strict=True):
        assert got.dtype == want.dtype.newbyteorder("<") or got.dtype == want.dtype
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert dumps(decoded.weights, names=decoded.names) == blob


def test_loaded_arrays_are_read_only():
    weights = loads(dumps(sample()))
    with pytest.raises(ValueError, match="read-only"):
        weights[0][0, 0] = 1.0


def test_names_change_the_id():
    weights = sample()
    assert model_id(dumps(weights)) != model_id(dumps(weights, names=["w", "x", "y", "z"]))


dtypes = st.sampled_from(sorted({dtype.str for dtype in DTYPES.values()}))
arrays = dtypes.flatmap(
    lambda dtype: hnp.arrays(
        dtype=np.dtype(dtype),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    )
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(arrays, max_size=5))
def test_property_round_trip_and_stable_id(weights):
    blob = dumps(weights)
    again = [np.array(w, copy=True) for w in weights]
    assert dumps(again) == blob
    restored = loads(blob, expected_id=model_id(blob))
    assert len(restored) == len(weights)
    for got, want in zip(restored, weights, strict=True):
        assert got.shape == want.shape
        assert got.tobytes() == np.ascontiguousarray(want, dtype=got.dtype).tobytes()
    assert dumps(restored) == blob


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_property_any_single_byte_flip_is_refused(data):
    blob = dumps(sample())
    position = data.draw(st.integers(0, len(blob) - 1))
    bit = data.draw(st.integers(0, 7))
    tampered = bytearray(blob)
    tampered[position] ^= 1 << bit
    with pytest.raises(ModelBlobError):
        loads(bytes(tampered), expected_id=model_id(blob))


def test_flipped_data_byte_reports_both_ids():
    blob = dumps(sample())
    tampered = bytearray(blob)
    tampered[-1] ^= 0xFF
    with pytest.raises(ModelIdMismatchError) as exc:
        loads(bytes(tampered), expected_id=model_id(blob))
    assert exc.value.expected == id_hex(model_id(blob))
    assert exc.value.actual == id_hex(model_id(bytes(tampered)))
    assert exc.value.expected in str(exc.value)
    assert exc.value.actual in str(exc.value)
    assert exc.value.code == "model_id_mismatch"


def test_wrong_expected_id_is_refused():
    blob = dumps(sample())
    other = model_id(dumps([np.zeros(1, dtype=np.float32)]))
    with pytest.raises(ModelIdMismatchError):
        loads(blob, expected_id=id_hex(other))
    assert loads(blob, expected_id=id_hex(model_id(blob)))  # the right one, as hex, passes


@pytest.mark.parametrize("cut", [1, 7, 20, 40])
def test_truncated_blob_is_refused(cut):
    blob = dumps(sample())
    with pytest.raises(BlobTruncatedError, match="truncated"):
        loads(blob[: len(blob) - cut])


def test_truncated_inside_the_header_is_refused():
    blob = dumps(sample())
    for size in (0, 3, 12, 16):
        with pytest.raises(BlobTruncatedError):
            loads(blob[:size])


def test_trailing_bytes_are_refused():
    with pytest.raises(BlobHeaderError, match="after the last tensor"):
        loads(dumps(sample()) + b"\x00")


def test_bad_magic_is_refused():
    blob = dumps(sample())
    with pytest.raises(BlobHeaderError, match="bad magic"):
        loads(b"NOTAFLEX" + blob[8:])


def test_unknown_version_is_refused():
    blob = bytearray(dumps(sample()))
    blob[8:10] = struct.pack("<H", 2)
    with pytest.raises(BlobHeaderError, match="version 2"):
        loads(bytes(blob))


def test_unknown_dtype_code_is_refused():
    blob = dumps([np.zeros(2, dtype=np.float32)], names=["w"])
    tampered = blob.replace(b"wf4", b"wc8")
    with pytest.raises(BlobDtypeError) as exc:
        loads(tampered)
    assert exc.value.code == "model_blob_dtype"
    assert "c8" in str(exc.value)


def test_duplicate_names_in_a_blob_are_refused():
    blob = dumps([np.zeros(1, np.float32), np.zeros(1, np.float32)], names=["a", "b"])
    with pytest.raises(BlobHeaderError, match="duplicate"):
        loads(blob.replace(b"\x01\x00b", b"\x01\x00a"))


@pytest.mark.parametrize(
    "weights",
    [
        [np.array([1 + 2j])],
        [np.array(["text"])],
        [np.array([True, False])],
        [np.array([object()], dtype=object)],
    ],
)
def test_unsupported_dtype_is_refused_on_write(weights):
    with pytest.raises(BlobDtypeError):
        dumps(weights)


def test_bad_names_are_refused_on_write():
    with pytest.raises(BlobHeaderError):
        dumps([np.zeros(1), np.zeros(1)], names=["a", "a"])
    with pytest.raises(BlobHeaderError):
        dumps([np.zeros(1)], names=[""])
    with pytest.raises(BlobHeaderError):
        dumps([np.zeros(1)], names=["a", "b"])


@pytest.mark.parametrize("value", ["0x1234", "zz" * 32, b"\x00" * 31, 42, 32])
def test_parse_id_refuses_what_is_not_an_id(value):
    with pytest.raises(ModelBlobError):
        parse_id(value)


def test_parse_id_accepts_bytes_and_hex():
    digest = model_id(b"x")
    assert parse_id(digest) == parse_id(id_hex(digest)) == parse_id(digest.hex()) == digest


def test_parse_id_error_does_not_echo_a_whole_blob():
    with pytest.raises(ModelBlobError) as exc:
        parse_id(b"x" * 100_000)
    assert len(str(exc.value)) < 200


def test_zero_size_tensor_with_an_impossible_shape_is_refused():
    blob = bytearray(dumps([np.zeros((0, 3), dtype=np.float32)]))
    # The last 8 header bytes are the second dimension: make it 2**62 (4 * 2**62 bytes).
    blob[-8:] = struct.pack("<Q", 2**62)
    with pytest.raises(BlobHeaderError, match="impossible shape"):
        loads(bytes(blob))
