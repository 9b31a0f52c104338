"""Canonical model format v2 and IDs: deterministic everywhere, bound to their task, round and
author, and every tampering refused with a named error."""

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

from tests.blobs import CONTRACT, TRAINER, blob_of, header_for
from training.errors import (
    BlobDtypeError,
    BlobHeaderError,
    BlobTooLongError,
    BlobTruncatedError,
    ChunkMismatchError,
    ModelBlobError,
    ModelIdMismatchError,
    WrongAuthorError,
    WrongKindError,
    WrongLayoutError,
    WrongModelRoundError,
    WrongTaskError,
)
from training.serialize import (
    ZERO_ADDRESS,
    Header,
    Kind,
    decode,
    encode,
    id_hex,
    model_id,
    parse_id,
    read_header,
)

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_CODE = (
    "import numpy as np\n"
    "from tests.blobs import blob_of\n"
    "sample = blob_of([np.arange(600, dtype=np.int32).reshape(20, 30) - 300,"
    " np.array([1.5, -2.0], dtype=np.float32), np.array(7, dtype=np.int32)],"
    " task_id=9, round_number=3)\n"
)
# Pinned: the bytes of format version 2 must never change, or on-chain IDs stop verifying.
SAMPLE_ID = "0xb6e085240e19942c6f488d23373cc2fe6962515443b1845de5ed724a6e14531c"


def sample() -> bytes:
    scope: dict = {}
    exec(SAMPLE_CODE, scope)
    return scope["sample"]


def test_layout_of_a_tiny_blob():
    values = [np.array([1, -2], dtype=np.int32)]
    header = header_for(values, task_id=5, round_number=2)
    blob = encode(header, values)
    head = (
        b"FLEXMDL2"
        + struct.pack(">HBBIQ", 2, 1, 16, 256, 31337)
        + bytes.fromhex(CONTRACT[2:])
        + struct.pack(">QI", 5, 2)
        + bytes.fromhex(TRAINER[2:])
        + struct.pack(">QHBI", 2, 1, 1, 2)
    )
    data = struct.pack(">ii", 1, -2)
    leaf = keccak(b"\x00" + data)
    assert blob == head + leaf + data
    # One chunk: the root is its leaf.
    assert model_id(blob) == keccak(b"\x02" + keccak(head) + leaf)


def test_sample_id_is_pinned():
    assert id_hex(model_id(sample())) == SAMPLE_ID


def test_same_id_in_a_fresh_process():
    code = SAMPLE_CODE + "from training.serialize import model_id, id_hex\n"
    code += "print(id_hex(model_id(sample)))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == SAMPLE_ID


def test_round_trip_keeps_header_and_values():
    blob = sample()
    decoded = decode(blob, expected_id=model_id(blob))
    assert decoded.header.task_id == 9
    assert decoded.header.round_number == 3
    assert decoded.header.kind == Kind.UPDATE
    assert decoded.header.trainer.lower() == TRAINER
    assert decoded.header.shapes == ((20, 30), (2,), ())
    np.testing.assert_array_equal(decoded.values[0], np.arange(600).reshape(20, 30) - 300)
    np.testing.assert_array_equal(decoded.values[1], [98304, -131072])
    np.testing.assert_array_equal(decoded.floats()[1], np.array([1.5, -2.0], np.float32))
    assert all(v.dtype == np.int32 for v in decoded.values)
    assert encode(decoded.header, decoded.values) == blob
    assert len(decoded.leaves) == decoded.header.leaf_count == 3  # 603 values, 256 a chunk


def test_decoded_values_are_read_only():
    with pytest.raises(ValueError, match="read-only"):
        decode(sample()).values[0][0, 0] = 1


def test_memory_layout_does_not_change_the_bytes():
    values = np.arange(12, dtype=np.int32).reshape(3, 4)
    swapped = values.astype(">i4")
    fortran = np.asfortranarray(values)
    strided = np.arange(24, dtype=np.int32).reshape(3, 8)[:, ::2]
    header = header_for([values])
    assert encode(header, [swapped]) == encode(header, [fortran]) == encode(header, [values])
    assert encode(header, [strided]) == encode(header, [np.ascontiguousarray(strided)])


@pytest.mark.parametrize(
    "change",
    [
        {"task_id": 2},
        {"round_number": 1},
        {"trainer": "0x" + "b2" * 20},
        {"kind": Kind.GLOBAL},
        {"chain_id": 1},
        {"contract": "0x" + "c1" * 20},
    ],
)
def test_equal_weights_under_another_header_are_another_model(change):
    weights = [np.ones((4, 4), np.float32)]
    assert model_id(blob_of(weights)) != model_id(blob_of(weights, **change))


int32_arrays = hnp.arrays(
    dtype=np.int32,
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
    elements=st.integers(-(2**31), 2**31 - 1),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(int32_arrays, min_size=1, max_size=4).filter(lambda a: sum(x.size for x in a) > 0),
    st.integers(1, 9),
)
def test_property_round_trip_and_stable_id(values, chunk_values):
    header = header_for(values, chunk_values=chunk_values)
    blob = encode(header, values)
    assert encode(header, [np.array(v, copy=True) for v in values]) == blob
    decoded = decode(blob, expected_id=model_id(blob))
    assert decoded.header == header
    for got, want in zip(decoded.values, values, strict=True):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_property_any_single_bit_flip_is_refused(data):
    blob = sample()
    position = data.draw(st.integers(0, len(blob) - 1))
    tampered = bytearray(blob)
    tampered[position] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(ModelBlobError):
        decode(bytes(tampered), expected_id=model_id(blob))


def test_flipped_value_names_its_chunk():
    blob = sample()
    tampered = bytearray(blob)
    tampered[-1] ^= 0xFF  # the last value: chunk 2
    with pytest.raises(ChunkMismatchError) as exc:
        decode(bytes(tampered), expected_id=model_id(blob))
    assert exc.value.index == 2
    assert exc.value.code == "model_chunk_mismatch"


def test_flipped_leaf_reports_both_ids():
    blob = sample()
    _, length = read_header(blob)
    tampered = bytearray(blob)
    tampered[length] ^= 0x01
    with pytest.raises(ModelIdMismatchError) as exc:
        decode(bytes(tampered), expected_id=model_id(blob))
    assert exc.value.expected == id_hex(model_id(blob))
    assert exc.value.actual not in (exc.value.expected, None)
    assert exc.value.expected in str(exc.value)
    assert exc.value.code == "model_id_mismatch"


def test_wrong_expected_id_is_refused():
    blob = sample()
    with pytest.raises(ModelIdMismatchError):
        decode(blob, expected_id=model_id(blob_of([np.zeros(1, np.float32)])))
    assert decode(blob, expected_id=id_hex(model_id(blob)))  # the right one, as hex, passes


@pytest.mark.parametrize("cut", [1, 4, 40, 2000])
def test_truncated_blob_is_refused(cut):
    blob = sample()
    with pytest.raises(BlobTruncatedError, match="truncated"):
        decode(blob[: len(blob) - cut])


def test_truncated_inside_the_header_is_refused():
    blob = sample()
    for size in (0, 3, 12, 90, 100):
        with pytest.raises(BlobTruncatedError):
            decode(blob[:size])


def test_trailing_bytes_are_refused():
    with pytest.raises(BlobTooLongError, match="after the last value"):
        decode(sample() + b"\x00")


def test_bad_magic_and_the_old_format_are_refused():
    blob = sample()
    with pytest.raises(BlobHeaderError, match="bad magic"):
        decode(b"FLEXMODL" + blob[8:])
    with pytest.raises(BlobHeaderError, match="version 1"):
        decode(blob[:8] + struct.pack(">H", 1) + blob[10:])


def _with_header_field(blob: bytes, offset: int, fmt: str, value: int) -> bytes:
    tampered = bytearray(blob)
    struct.pack_into(fmt, tampered, offset, value)
    return bytes(tampered)


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "words"),
    [
        (10, ">B", 2, "kind"),
        (12, ">I", 0, "chunk_values"),
        (12, ">I", 1 << 20, "chunk_values"),
        (76, ">Q", 604, "count 604"),
        (84, ">H", 0, "tensors"),
        (86, ">B", 9, "9 dimensions"),
    ],
)
def test_malformed_header_fields_are_refused(offset, fmt, value, words):
    with pytest.raises(BlobHeaderError, match=words):
        decode(_with_header_field(sample(), offset, fmt, value))


def test_kind_and_trainer_must_agree():
    with pytest.raises(BlobHeaderError, match="trainer"):
        header_for([np.zeros(1, np.int32)], kind=Kind.UPDATE, trainer=ZERO_ADDRESS)
    with pytest.raises(BlobHeaderError, match="trainer"):
        header_for([np.zeros(1, np.int32)], kind=Kind.GLOBAL, trainer=TRAINER)
    global_blob = blob_of([np.zeros(1, np.float32)], kind=Kind.GLOBAL)
    # An update's trainer field written into a global model: refused on read.
    forged = global_blob[:56] + bytes.fromhex(TRAINER[2:]) + global_blob[76:]
    with pytest.raises(BlobHeaderError, match="trainer"):
        decode(forged)


def test_writing_refuses_floats_and_wrong_shapes():
    with pytest.raises(BlobDtypeError, match="quantize"):
        encode(header_for([np.zeros(3)]), [np.zeros(3, np.float32)])
    with pytest.raises(BlobDtypeError):
        encode(header_for([np.zeros(3)]), [np.zeros(3, np.int64)])
    with pytest.raises(BlobHeaderError, match="shapes"):
        encode(header_for([np.zeros(3)]), [np.zeros(4, np.int32)])
    with pytest.raises(BlobHeaderError, match="values"):
        header_for([np.zeros((0, 3))])  # a model holds at least one value


def _header(**change) -> Header:
    base = {"kind": Kind.UPDATE, "task_id": 1, "round_number": 4, "trainer": TRAINER}
    return header_for([np.zeros((2, 3), np.int32)], **{**base, **change})


@pytest.mark.parametrize(
    ("change", "error", "code"),
    [
        ({"kind": Kind.GLOBAL, "trainer": ZERO_ADDRESS}, WrongKindError, "model_wrong_kind"),
        ({"chain_id": 1}, WrongTaskError, "model_wrong_task"),
        ({"contract": "0x" + "c1" * 20}, WrongTaskError, "model_wrong_task"),
        ({"task_id": 2}, WrongTaskError, "model_wrong_task"),
        ({"round_number": 3}, WrongModelRoundError, "model_wrong_round"),
        ({"trainer": "0x" + "b2" * 20}, WrongAuthorError, "update_wrong_author"),
        ({"chunk_values": 128}, WrongLayoutError, "model_wrong_layout"),
    ],
)
def test_header_check_names_the_first_field_that_differs(change, error, code):
    _header().check(_header())
    with pytest.raises(error) as exc:
        _header(**change).check(_header())
    assert exc.value.code == code


def test_header_check_refuses_other_shapes():
    other = header_for([np.zeros((3, 2), np.int32)], round_number=4)
    with pytest.raises(WrongLayoutError, match="shapes"):
        other.check(_header())


@pytest.mark.parametrize("value", ["0x1234", "zz" * 32, b"\x00" * 31, 42, 32])
def test_parse_id_refuses_what_is_not_an_id(value):
    with pytest.raises(ModelBlobError):
        parse_id(value)


def test_parse_id_accepts_bytes_and_hex():
    digest = keccak(b"x")
    assert parse_id(digest) == parse_id(id_hex(digest)) == parse_id(digest.hex()) == digest


def test_parse_id_error_does_not_echo_a_whole_blob():
    with pytest.raises(ModelBlobError) as exc:
        parse_id(b"x" * 100_000)
    assert len(str(exc.value)) < 200
