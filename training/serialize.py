"""Canonical byte format of a model's weights, and model IDs (keccak256 of those bytes).

Format, version 1 (all integers little-endian)::

    magic      8 bytes   b"FLEXMODL"
    version    u16       1
    count      u32       number of tensors, at most MAX_TENSORS
    count times, in the model's weight order:
        name_len   u16       1..MAX_NAME bytes
        name       UTF-8     unique within the blob
        dtype      2 ASCII   numpy kind and item size: f2 f4 f8 i1 i2 i4 i8 u1 u2 u4 u8
        ndim       u8        at most MAX_NDIM
        dims       ndim x u64
    data: each tensor's elements, little-endian, C order, back to back in header order;
    nothing after the last tensor.

Every choice is fixed, so the same weights (names, shapes, dtypes, bit patterns) give the same
bytes and the same ID on any machine. safetensors was considered and not used: its writer's
tensor order, header key order and padding are implementation choices its spec does not fix
(they have changed between releases), so two nodes on different versions could disagree on an
ID.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from eth_hash.auto import keccak

from training.errors import (
    BlobDtypeError,
    BlobHeaderError,
    BlobTruncatedError,
    ModelBlobError,
    ModelIdMismatchError,
)

MAGIC = b"FLEXMODL"
VERSION = 1
MAX_TENSORS = 1 << 16
MAX_NAME = 255
MAX_NDIM = 8
DTYPES: dict[bytes, np.dtype] = {
    code.encode("ascii"): np.dtype("<" + code)
    for code in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8")
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_PREAMBLE = struct.Struct("<8sHI")
_TENSOR = struct.Struct("<2sB")


@dataclass(frozen=True)
class ModelBlob:
    """A decoded blob: tensor names and weights (read-only views on the blob) and its ID."""

    names: list[str]
    weights: list[np.ndarray]
    model_id: bytes


def model_id(blob: bytes | bytearray | memoryview) -> bytes:
    """keccak256 of the blob: the model's bytes32 ID."""
    return keccak(bytes(blob) if isinstance(blob, memoryview) else blob)


def id_hex(value: bytes) -> str:
    """A model ID shown as 0x-prefixed lowercase hex."""
    return "0x" + bytes(value).hex()


def parse_id(value: bytes | str) -> bytes:
    """A model ID from 32 bytes or 0x hex; raises ModelBlobError when it is neither."""
    if isinstance(value, str):
        text = value.removeprefix("0x").removeprefix("0X")
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = b""
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
    else:
        raw = b""
    if len(raw) != 32:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ModelBlobError(f"not a model ID (32 bytes or 0x + 64 hex digits): {shown}")
    return raw


def _canonical_dtype(array: np.ndarray, name: str) -> tuple[np.dtype, bytes]:
    dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    canonical = np.dtype(f"<{dtype.kind}{dtype.itemsize}")
    if dtype != canonical or canonical not in _CODES:
        raise BlobDtypeError(
            f"tensor {name!r} has dtype {array.dtype}; supported: "
            + " ".join(code.decode() for code in DTYPES),
            name=name,
            dtype=str(array.dtype),
        )
    return canonical, _CODES[canonical]


def dumps(weights: Sequence[np.ndarray], *, names: Sequence[str] | None = None) -> bytes:
    """The canonical bytes of ``weights`` (names default to "0", "1", ... by position)."""
    names = [str(i) for i in range(len(weights))] if names is None else list(names)
    if len(names) != len(weights):
        raise BlobHeaderError(f"{len(names)} names for {len(weights)} tensors")
    if len(weights) > MAX_TENSORS:
        raise BlobHeaderError(f"{len(weights)} tensors; at most {MAX_TENSORS} fit a blob")
    if len(set(names)) != len(names):
        raise BlobHeaderError("tensor names must be unique")
    parts: list[bytes | memoryview] = [_PREAMBLE.pack(MAGIC, VERSION, len(weights))]
    data: list[memoryview] = []
    for name, weight in zip(names, weights, strict=True):
        array = np.asarray(weight)
        encoded = name.encode("utf-8")
        if not 1 <= len(encoded) <= MAX_NAME:
            raise BlobHeaderError(f"tensor name {name!r} must be 1 to {MAX_NAME} UTF-8 bytes")
        if array.ndim > MAX_NDIM:
            raise BlobHeaderError(f"tensor {name!r} has {array.ndim} dimensions; max {MAX_NDIM}")
        dtype, code = _canonical_dtype(array, name)
        array = array.astype(dtype, order="C", copy=False)
        parts += [
            struct.pack("<H", len(encoded)),
            encoded,
            _TENSOR.pack(code, array.ndim),
            struct.pack(f"<{array.ndim}Q", *array.shape),
        ]
        data.append(memoryview(array.reshape(-1).view(np.uint8)))
    return b"".join([*parts, *data])


def decode(blob: bytes, *, expected_id: bytes | str | None = None) -> ModelBlob:
    """Parse and check a blob; raises a ModelBlobError subclass saying what is wrong with it."""
    view = memoryview(blob)
    offset = 0

    def take(size: int, what: str) -> memoryview:
        nonlocal offset
        if offset + size > len(view):
            raise BlobTruncatedError(
                f"model blob truncated: ends at byte {len(view)} inside the header ({what})",
                size=len(view),
            )
        chunk = view[offset : offset + size]
        offset += size
        return chunk

    if len(view) < len(MAGIC) and MAGIC.startswith(bytes(view)):
        raise BlobTruncatedError(f"model blob truncated: only {len(view)} bytes", size=len(view))
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise BlobHeaderError("malformed model blob header: not a FLEX model blob (bad magic)")
    _, version, count = _PREAMBLE.unpack(take(_PREAMBLE.size, "preamble"))
    if version != VERSION:
        raise BlobHeaderError(
            f"malformed model blob header: format version {version}, this node reads {VERSION}"
        )
    if count > MAX_TENSORS:
        raise BlobHeaderError(f"malformed model blob header: {count} tensors, max {MAX_TENSORS}")
    entries: list[tuple[str, np.dtype, tuple[int, ...]]] = []
    for index in range(count):
        (name_len,) = struct.unpack("<H", take(2, f"tensor {index} name length"))
        if not 1 <= name_len <= MAX_NAME:
            raise BlobHeaderError(
                f"malformed model blob header: tensor {index} name length {name_len}"
            )
        try:
            name = str(take(name_len, f"tensor {index} name"), "utf-8")
        except UnicodeDecodeError:
            raise BlobHeaderError(
                f"malformed model blob header: tensor {index} name is not UTF-8"
            ) from None
        code, ndim = _TENSOR.unpack(take(_TENSOR.size, f"tensor {index} dtype"))
        if code not in DTYPES:
            raise BlobDtypeError(
                f"model blob tensor {name!r} has unsupported dtype code {code!r}",
                name=name,
                dtype=code.decode("latin-1"),
            )
        if ndim > MAX_NDIM:
            raise BlobHeaderError(f"malformed model blob header: tensor {name!r} has {ndim} dims")
        shape = struct.unpack(f"<{ndim}Q", take(8 * ndim, f"tensor {index} shape"))
        # A tensor with a zero dimension holds no bytes, but numpy must still be able to
        # represent its shape.
        if math.prod(d for d in shape if d) * DTYPES[code].itemsize > sys.maxsize:
            raise BlobHeaderError(
                f"malformed model blob header: tensor {name!r} has an impossible shape {shape}"
            )
        entries.append((name, DTYPES[code], shape))
    names = [name for name, _, _ in entries]
    if len(set(names)) != len(names):
        raise BlobHeaderError("malformed model blob header: duplicate tensor names")
    declared = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in entries)
    available = len(view) - offset
    if available < declared:
        raise BlobTruncatedError(
            f"model blob truncated: header declares {declared} data bytes, {available} present",
            declared=declared,
            available=available,
        )
    if available > declared:
        raise BlobHeaderError(
            f"malformed model blob: {available - declared} bytes after the last tensor"
        )
    weights: list[np.ndarray] = []
    for _, dtype, shape in entries:
        size = math.prod(shape)
        weights.append(np.frombuffer(blob, dtype=dtype, count=size, offset=offset).reshape(shape))
        offset += size * dtype.itemsize
    actual = model_id(blob)
    if expected_id is not None and actual != (expected := parse_id(expected_id)):
        raise ModelIdMismatchError(expected=id_hex(expected), actual=id_hex(actual))
    return ModelBlob(names=names, weights=weights, model_id=actual)


def loads(blob: bytes, *, expected_id: bytes | str | None = None) -> list[np.ndarray]:
    """The weights in a blob (read-only arrays), checked against ``expected_id`` if given."""
    return decode(blob, expected_id=expected_id).weights
