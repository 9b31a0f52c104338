"""Bundled digits, the fixed test split, Dirichlet partitions and a device's own files."""

from __future__ import annotations

import numpy as np
import pytest

from training.catalogue import SCHEMAS
from training.datasets import (
    check_dataset,
    dirichlet_partition,
    load_local,
    load_partition,
    load_test,
    load_train,
    split_indices,
)
from training.errors import DatasetError

SCHEMA = SCHEMAS["digits-8x8"]


def test_bundled_digits_are_scaled_and_shaped():
    train, test = load_train(schema=SCHEMA), load_test(schema="digits-8x8")
    assert len(train) + len(test) == 1797
    for data in (train, test):
        assert data.x.dtype == np.float32
        assert data.x.shape[1:] == (8, 8, 1)
        assert data.y.dtype == np.int64
        assert data.x.min() == 0.0
        assert data.x.max() == 1.0
    assert set(np.unique(test.y)) == set(range(10))


def test_test_split_is_fixed_disjoint_and_about_a_fifth():
    train_idx, test_idx = split_indices(schema=SCHEMA)
    assert set(train_idx).isdisjoint(test_idx)
    assert len(train_idx) + len(test_idx) == 1797
    assert 0.19 <= len(test_idx) / 1797 <= 0.21
    # Pinned: the split depends on no generator, so it is the same on every machine.
    assert len(test_idx) == 355
    assert test_idx[:5].tolist() == [33, 36, 37, 40, 44]
    again_train, again_test = split_indices(schema="digits-8x8")
    assert np.array_equal(test_idx, again_test)
    assert np.array_equal(train_idx, again_train)


def test_test_split_is_stratified():
    test = load_test(schema=SCHEMA)
    counts = np.bincount(test.y, minlength=10)
    assert counts.min() >= 34
    assert counts.max() <= 37


def test_no_bundled_data_for_an_unknown_schema():
    with pytest.raises(Exception, match="unknown dataset schema"):
        load_train(schema="cifar-10")


def test_partitions_use_every_training_sample_once():
    labels = load_train(schema=SCHEMA).y
    parts = dirichlet_partition(labels=labels, count=7, alpha=0.5, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    assert all(len(p) > 0 for p in parts)


def test_partitions_are_deterministic_for_a_seed():
    labels = load_train(schema=SCHEMA).y
    first = dirichlet_partition(labels=labels, count=5, alpha=0.5, seed=11)
    second = dirichlet_partition(labels=labels, count=5, alpha=0.5, seed=11)
    other = dirichlet_partition(labels=labels, count=5, alpha=0.5, seed=12)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def label_skew(parts, labels):
    """Mean total-variation distance between each part's label mix and the overall mix."""
    overall = np.bincount(labels, minlength=10) / len(labels)
    mixes = [np.bincount(labels[p], minlength=10) / len(p) for p in parts]
    return float(np.mean([0.5 * np.abs(mix - overall).sum() for mix in mixes]))


def test_small_alpha_skews_labels_more_than_large_alpha():
    labels = load_train(schema=SCHEMA).y
    skewed = dirichlet_partition(labels=labels, count=5, alpha=0.1, seed=0)
    near_iid = dirichlet_partition(labels=labels, count=5, alpha=1000.0, seed=0)
    assert label_skew(skewed, labels) > 0.4
    assert label_skew(near_iid, labels) < 0.05


def test_every_partition_non_empty_even_when_draws_leave_one_empty():
    labels = np.zeros(12, dtype=np.int64)  # one class: tiny alpha puts nearly all in one part
    parts = dirichlet_partition(labels=labels, count=10, alpha=0.01, seed=0)
    assert all(len(p) >= 1 for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(12))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"count": 0}, "count must be at least 1"),
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"alpha": float("nan")}, "alpha must be > 0"),
        ({"count": 5000}, "cannot fill 5000"),
    ],
)
def test_bad_partition_arguments(kwargs, words):
    labels = load_train(schema=SCHEMA).y
    args = {"labels": labels, "count": 5, "alpha": 0.5, "seed": 0, **kwargs}
    with pytest.raises(DatasetError, match=words):
        dirichlet_partition(**args)


def test_load_partition_matches_the_partitioner():
    train = load_train(schema=SCHEMA)
    parts = dirichlet_partition(labels=train.y, count=4, alpha=0.3, seed=5)
    data = load_partition(schema=SCHEMA, index=2, count=4, alpha=0.3, seed=5)
    assert np.array_equal(data.y, train.y[parts[2]])
    assert np.array_equal(data.x, train.x[parts[2]])


@pytest.mark.parametrize("index", [-1, 4, True])
def test_load_partition_refuses_bad_index(index):
    with pytest.raises(DatasetError, match="index"):
        load_partition(schema=SCHEMA, index=index, count=4, alpha=0.3, seed=5)


# A device's own data


def good_arrays(n=20, flat=False):
    rng = np.random.default_rng(0)
    x = rng.random((n, 64) if flat else (n, 8, 8, 1))
    y = rng.integers(0, 10, n)
    return x, y


@pytest.mark.parametrize("flat", [False, True])
def test_load_npz(tmp_path, flat):
    x, y = good_arrays(flat=flat)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    data = load_local(path=tmp_path / "mine.npz", schema=SCHEMA)
    assert data.x.shape == (20, 8, 8, 1)
    assert data.x.dtype == np.float32
    np.testing.assert_array_equal(data.y, y)
    np.testing.assert_allclose(data.x.reshape(20, 64), x.reshape(20, 64), rtol=1e-6)


def write_csv(path, x, y, header=None, label_last=False):
    lines = [] if header is None else [header]
    for row, label in zip(x.reshape(len(x), -1), y, strict=True):
        cells = [f"{v:.6f}" for v in row]
        cells = [*cells, str(label)] if label_last else [str(label), *cells]
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")


def test_load_csv_without_header_takes_the_first_column_as_label(tmp_path):
    x, y = good_arrays()
    write_csv(tmp_path / "mine.csv", x, y)
    data = load_local(path=str(tmp_path / "mine.csv"), schema="digits-8x8")
    np.testing.assert_array_equal(data.y, y)
    np.testing.assert_allclose(data.x.reshape(20, 64), x.reshape(20, 64), atol=1e-6)


def test_load_csv_with_header_finds_the_label_column(tmp_path):
    x, y = good_arrays()
    header = ",".join([*(f"p{i}" for i in range(64)), "label"])
    write_csv(tmp_path / "mine.csv", x, y, header=header, label_last=True)
    data = load_local(path=tmp_path / "mine.csv", schema=SCHEMA)
    np.testing.assert_array_equal(data.y, y)


def npz_error(tmp_path, **arrays):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError) as exc:
        load_local(path=tmp_path / "bad.npz", schema=SCHEMA)
    assert exc.value.code == "dataset_invalid"
    assert exc.value.source == "bad.npz"
    return str(exc.value)


def test_npz_wrong_sample_shape(tmp_path):
    x, y = good_arrays()
    message = npz_error(tmp_path, x=x[:, :4, :4, :], y=y)
    assert "each sample has shape (4, 4, 1) (16 values)" in message
    assert "expects (8, 8, 1) (64 values)" in message


def test_npz_labels_out_of_range(tmp_path):
    x, y = good_arrays()
    y[3] = 10
    assert "classes 0 to 9" in npz_error(tmp_path, x=x, y=y)


def test_npz_negative_label(tmp_path):
    x, y = good_arrays()
    y[0] = -1
    assert "labels range from -1" in npz_error(tmp_path, x=x, y=y)


def test_npz_fractional_labels(tmp_path):
    x, y = good_arrays()
    assert "whole numbers" in npz_error(tmp_path, x=x, y=y + 0.5)


def test_npz_unscaled_values(tmp_path):
    x, y = good_arrays()
    assert "scale your data" in npz_error(tmp_path, x=x * 16, y=y)


def test_npz_length_mismatch(tmp_path):
    x, y = good_arrays()
    assert "20 samples but y has 19 labels" in npz_error(tmp_path, x=x, y=y[:-1])


def test_npz_missing_array(tmp_path):
    x, _ = good_arrays()
    assert "missing array(s) ['y']" in npz_error(tmp_path, x=x, labels=x)


def test_npz_one_hot_labels(tmp_path):
    x, y = good_arrays()
    assert "one integer label per sample" in npz_error(tmp_path, x=x, y=np.eye(10)[y])


def test_npz_empty(tmp_path):
    assert "no samples" in npz_error(tmp_path, x=np.zeros((0, 64)), y=np.zeros(0))


def test_npz_nan(tmp_path):
    x, y = good_arrays()
    x[0, 0, 0, 0] = np.nan
    assert "NaN" in npz_error(tmp_path, x=x, y=y)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    x, y = good_arrays()
    assert "allow_pickle=False" in npz_error(tmp_path, x=x.astype(object), y=y)


def test_text_arrays_are_refused(tmp_path):
    x, y = good_arrays()
    assert "x must hold numbers" in npz_error(tmp_path, x=x.astype(str), y=y)


def test_csv_wrong_width(tmp_path):
    x, y = good_arrays()
    write_csv(tmp_path / "bad.csv", x[:, :, :4, :], y)
    with pytest.raises(DatasetError, match=r"shape \(32,\) \(32 values\)"):
        load_local(path=tmp_path / "bad.csv", schema=SCHEMA)


def test_csv_text_cell(tmp_path):
    x, y = good_arrays()
    write_csv(tmp_path / "bad.csv", x, y)
    lines = (tmp_path / "bad.csv").read_text().splitlines()
    lines[3] = lines[3].replace(",", ",seven,", 1)
    (tmp_path / "bad.csv").write_text("\n".join(lines))
    with pytest.raises(DatasetError, match="not a numeric CSV table"):
        load_local(path=tmp_path / "bad.csv", schema=SCHEMA)


def test_csv_label_out_of_range(tmp_path):
    x, y = good_arrays()
    y[0] = 12
    write_csv(tmp_path / "bad.csv", x, y)
    with pytest.raises(DatasetError, match="classes 0 to 9"):
        load_local(path=tmp_path / "bad.csv", schema=SCHEMA)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_local(path=tmp_path / "absent.npz", schema=SCHEMA)
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(DatasetError, match=r"unsupported file type '\.parquet'"):
        load_local(path=tmp_path / "data.parquet", schema=SCHEMA)


def test_not_an_npz(tmp_path):
    (tmp_path / "fake.npz").write_bytes(b"hello")
    with pytest.raises(DatasetError, match=r"not a readable \.npz"):
        load_local(path=tmp_path / "fake.npz", schema=SCHEMA)


def test_check_dataset_names_the_source():
    with pytest.raises(DatasetError) as exc:
        check_dataset(x=np.zeros((2, 3)), y=np.zeros(2), schema=SCHEMA, source="sensor feed")
    assert str(exc.value).startswith("sensor feed: ")
    assert exc.value.schema == "digits-8x8"
