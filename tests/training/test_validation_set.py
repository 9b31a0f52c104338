"""The buyer's validation set: one canonical encoding and ID, and every bad upload refused with
an error that names what is wrong."""

from __future__ import annotations

import io

import numpy as np
import pytest

from training import validation
from training.datasets import Dataset, load_test
from training.errors import SpecError
from training.spec import TaskSpec
from training.validation import ValidationSetError


def npz(x, y) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    return buffer.getvalue()


def digits(count: int = 50) -> tuple[np.ndarray, np.ndarray]:
    test = load_test(schema="digits-8x8")
    return test.x[:count], test.y[:count]


def test_canonical_bytes_round_trip_and_id_is_stable_across_file_formats():
    x, y = digits()
    from_npz = validation.from_upload(data=npz(x, y), filename="val.npz", schema="digits-8x8")
    table = np.column_stack([y, x.reshape(len(x), -1)])
    csv = "\n".join(",".join(repr(float(v)) for v in row) for row in table).encode()
    from_csv = validation.from_upload(data=csv, filename="VAL.CSV", schema="digits-8x8")
    assert from_npz == from_csv
    assert validation.validation_id(from_npz) == validation.validation_id(from_csv)
    # A flat (n, 64) upload is the same set as an (n, 8, 8, 1) one.
    flat = validation.from_upload(
        data=npz(x.reshape(len(x), -1), y), filename="v.npz", schema="digits-8x8"
    )
    assert flat == from_npz
    back = validation.decode(
        from_npz, schema="digits-8x8", expected_id=validation.validation_id(from_npz)
    )
    assert np.array_equal(back.x, x)
    assert np.array_equal(back.y, y)
    assert validation.encode(Dataset(x=back.x, y=back.y)) == from_npz


def test_bundled_set_is_the_held_out_split_and_the_same_every_time():
    blob = validation.bundled(schema="digits-8x8")
    assert blob == validation.bundled(schema="digits-8x8")
    data = validation.decode(blob, schema="digits-8x8")
    test = load_test(schema="digits-8x8")
    assert np.array_equal(data.x, test.x)
    assert np.array_equal(data.y, test.y)


@pytest.mark.parametrize(
    ("make", "filename", "needle"),
    [
        (lambda x, y: npz(x, y), "val.txt", "unsupported file type '.txt'"),
        (lambda x, y: b"x" * (validation.MAX_UPLOAD_BYTES + 1), "val.npz", "at most"),
        (lambda x, y: b"not a zip", "val.npz", "not a readable .npz"),
        (lambda x, y: npz(x[:, :4, :4], y), "val.npz", "expects (8, 8, 1)"),
        (lambda x, y: npz(x * 16, y), "val.npz", "scale your data"),
        (lambda x, y: npz(x, y + 10), "val.npz", "classes 0 to 9"),
        (lambda x, y: npz(x, y[:-1]), "val.npz", "labels"),
        (lambda x, y: npz(x[:5], y[:5]), "val.npz", "holds 5 samples"),
        (lambda x, y: npz(np.where(x > 0.5, np.nan, x), y), "val.npz", "NaN"),
        (lambda x, y: npz(x.astype(str), y), "val.npz", "dtype"),
        (lambda x, y: b"label,a\n1,zz\n", "val.csv", "not a numeric CSV"),
    ],
)
def test_bad_uploads_are_refused_naming_the_file_and_the_fault(make, filename, needle):
    x, y = digits()
    with pytest.raises(ValidationSetError) as exc:
        validation.from_upload(data=make(x, y), filename=filename, schema="digits-8x8")
    assert needle in exc.value.message
    assert exc.value.message.startswith(filename)


def test_decode_refuses_bytes_that_are_not_the_committed_set():
    blob = validation.bundled(schema="digits-8x8")
    other = validation.from_upload(data=npz(*digits()), filename="v.npz", schema="digits-8x8")
    with pytest.raises(ValidationSetError, match="hash to"):
        validation.decode(other, schema="digits-8x8", expected_id=validation.validation_id(blob))
    with pytest.raises(ValidationSetError, match="header declares"):
        validation.decode(blob[:-4], schema="digits-8x8")
    with pytest.raises(ValidationSetError, match="not FLEX validation bytes"):
        validation.decode(b"X" * 100, schema="digits-8x8")


def test_spec_commits_to_a_validation_id_and_specs_without_one_keep_their_hash():
    plain = TaskSpec(model="digits-mlp", dataset="digits-8x8", rounds=2)
    assert "validation" not in plain.as_dict()
    content_id = validation.validation_id(validation.bundled(schema="digits-8x8"))
    scored = TaskSpec.from_dict({**plain.as_dict(), "validation": "0x" + content_id[2:].upper()})
    assert scored.validation == content_id
    assert scored.as_dict()["validation"] == content_id
    assert scored.hash != plain.hash
    assert TaskSpec.from_json(scored.as_json()) == scored
    for bad in ("0x1234", content_id[2:], 7, "0x" + "g" * 64):
        with pytest.raises(SpecError) as exc:
            TaskSpec.from_dict({**plain.as_dict(), "validation": bad})
        assert exc.value.fields["field"] == "validation"
