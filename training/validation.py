"""The buyer's validation set: checked against the task's schema, in one canonical encoding
whose keccak256 is the content ID the task spec commits to (docs/scoring.md).

Canonical bytes: ``FLEXVAL1``, the sample count and the features per sample (uint32 little
endian each), every feature as float32 little endian (sample-major), then every label as
uint32 little endian. The same samples in the same order give the same bytes everywhere.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np

from core.hashing import keccak
from training.catalogue import Schema, get_schema
from training.datasets import Dataset, check_dataset, load_local, load_test
from training.errors import DatasetError

MAGIC = b"FLEXVAL1"
_HEAD = struct.Struct("<8sII")
# Scoring evaluates every candidate model on the whole set once per update per round.
MAX_SAMPLES = 5000
MIN_SAMPLES = 10
# An upload is parsed in memory; its canonical form is at most 4 bytes a value plus a label.
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
UPLOAD_SUFFIXES = (".npz", ".csv")


class ValidationSetError(DatasetError):
    """A validation set that cannot be used, and why."""

    code = "validation_set_invalid"


def _schema(schema: Schema | str) -> Schema:
    return schema if isinstance(schema, Schema) else get_schema(key=schema)


def validation_id(blob: bytes) -> str:
    """The content ID of canonical validation bytes: keccak256, as 0x hex."""
    return "0x" + keccak(bytes(blob)).hex()


def encode(data: Dataset) -> bytes:
    """The canonical bytes of ``data`` (see the module docstring)."""
    count = len(data)
    x = np.ascontiguousarray(data.x.reshape(count, -1), dtype="<f4")
    y = np.ascontiguousarray(data.y, dtype="<u4")
    return _HEAD.pack(MAGIC, count, x.shape[1]) + x.tobytes() + y.tobytes()


def _check_count(count: int, *, source: str, schema: Schema) -> None:
    if not MIN_SAMPLES <= count <= MAX_SAMPLES:
        raise ValidationSetError(
            source=source,
            schema=schema.key,
            reason=f"holds {count} samples; a validation set holds {MIN_SAMPLES} to {MAX_SAMPLES}",
        )


def decode(blob: bytes, *, schema: Schema | str, expected_id: str | None = None) -> Dataset:
    """The samples in canonical validation bytes, checked against ``expected_id`` (when
    given) and the schema; raises ValidationSetError saying what does not fit."""
    schema = _schema(schema)
    source = expected_id or "validation set"
    if expected_id is not None and validation_id(blob).lower() != expected_id.lower():
        raise ValidationSetError(
            source=source, reason=f"the bytes hash to {validation_id(blob)}, not to its ID"
        )
    if len(blob) < _HEAD.size:
        raise ValidationSetError(source=source, reason="shorter than its header")
    magic, count, features = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise ValidationSetError(source=source, reason="not FLEX validation bytes")
    _check_count(count, source=source, schema=schema)
    if features != schema.num_features:
        raise ValidationSetError(
            source=source,
            schema=schema.key,
            reason=f"{features} features a sample; schema {schema.key!r} has {schema.num_features}",
        )
    expected = _HEAD.size + count * features * 4 + count * 4
    if len(blob) != expected:
        raise ValidationSetError(
            source=source, reason=f"{len(blob)} bytes where its header declares {expected}"
        )
    x = np.frombuffer(blob, dtype="<f4", count=count * features, offset=_HEAD.size)
    y = np.frombuffer(blob, dtype="<u4", count=count, offset=_HEAD.size + x.nbytes)
    return check_dataset(
        x=x.reshape(count, features), y=y.astype(np.int64), schema=schema, source=source
    )


def from_upload(*, data: bytes, filename: str, schema: Schema | str) -> bytes:
    """Canonical validation bytes from an uploaded .npz (arrays ``x``, ``y``) or .csv file
    (as a device's own data, training.datasets.load_local); raises ValidationSetError or
    DatasetError naming what is wrong: type, size, shapes, values, labels, sample count."""
    schema = _schema(schema)
    suffix = Path(filename or "").suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise ValidationSetError(
            source=filename or "upload",
            reason=f"unsupported file type {suffix or '(none)'!r}; use .npz (arrays x, y) or "
            ".csv (label column + features)",
        )
    if len(data) > MAX_UPLOAD_BYTES:
        raise ValidationSetError(
            source=filename,
            reason=f"{len(data)} bytes; a validation file is at most {MAX_UPLOAD_BYTES} bytes",
        )
    with tempfile.TemporaryDirectory(prefix="flex-validation-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            dataset = load_local(path=path, schema=schema)
        except DatasetError as exc:
            # Name the buyer's file, not the temporary copy.
            raise ValidationSetError(
                source=filename, reason=exc.fields.get("reason", exc.message), schema=schema.key
            ) from None
    _check_count(len(dataset), source=filename, schema=schema)
    return encode(dataset)


def bundled(*, schema: Schema | str) -> bytes:
    """Canonical validation bytes of the schema's bundled held-out split (the same samples
    as its test split, which no device trains on): the local stack's and the demo's set."""
    return encode(load_test(schema=_schema(schema)))
