"""Training data: the bundled digits set, its fixed test split, non-IID partitions, own files."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.catalogue import Schema, get_schema
from training.errors import DatasetError

# Every TEST_EVERY-th sample of each class (by position in the bundled file) is held out:
# a 20 % stratified split that depends on no random generator, so it is the same everywhere.
TEST_EVERY = 5


@dataclass(frozen=True, eq=False)
class Dataset:
    """Samples shaped as the schema says (float32) and their integer labels (int64)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def _schema(schema: Schema | str) -> Schema:
    return schema if isinstance(schema, Schema) else get_schema(key=schema)


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # sklearn takes a second to import; only nodes that use the bundled data pay for it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 8, 8, 1)
    y = bunch.target.astype(np.int64)
    rank = np.empty(len(y), dtype=np.int64)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rank[members] = np.arange(len(members))
    test = rank % TEST_EVERY == TEST_EVERY - 1
    for array in (x, y, test):
        array.setflags(write=False)
    return x, y, test


_BUNDLED = {"digits-8x8": _digits}


def _bundled(schema: Schema) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    loader = _BUNDLED.get(schema.key)
    if loader is None:
        raise DatasetError(
            source=schema.key, reason="no bundled data for this schema; use the device's own file"
        )
    return loader()


def split_indices(*, schema: Schema | str) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the bundled set of the training samples and of the held-out test samples."""
    _, _, test = _bundled(_schema(schema))
    return np.flatnonzero(~test), np.flatnonzero(test)


def load_train(*, schema: Schema | str) -> Dataset:
    """The bundled set's training split (everything the test split does not hold)."""
    x, y, test = _bundled(_schema(schema))
    return Dataset(x=x[~test], y=y[~test])


def load_test(*, schema: Schema | str) -> Dataset:
    """The bundled set's fixed held-out test split (20 %, stratified)."""
    x, y, test = _bundled(_schema(schema))
    return Dataset(x=x[test], y=y[test])


def dirichlet_partition(
    *, labels: np.ndarray, count: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Split sample indices into ``count`` non-empty, disjoint parts with Dirichlet label skew.

    For each class, shares drawn from Dir(alpha) decide how its samples are dealt out (small
    alpha: each part sees few classes; large alpha: close to IID). A part left empty takes one
    sample from the largest part. Deterministic for a seed (and numpy's Generator).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise DatasetError(source="partition", reason=f"count must be at least 1, got {count!r}")
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise DatasetError(source="partition", reason=f"alpha must be > 0, got {alpha!r}")
    if len(labels) < count:
        raise DatasetError(
            source="partition",
            reason=f"{len(labels)} samples cannot fill {count} non-empty partitions",
        )
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(count)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(count, float(alpha)))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for part, chunk in zip(parts, np.split(members, cuts), strict=True):
            part.append(chunk)
    merged = [np.concatenate(part) for part in parts]
    for index, part in enumerate(merged):
        if len(part) == 0:
            donor = int(np.argmax([len(p) for p in merged]))
            merged[index], merged[donor] = merged[donor][-1:], merged[donor][:-1]
    return [np.sort(part) for part in merged]


def load_partition(
    *, schema: Schema | str, index: int, count: int, alpha: float, seed: int
) -> Dataset:
    """Partition ``index`` of ``count`` of the bundled training split (Dirichlet label skew)."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise DatasetError(
            source="partition", reason=f"index must be in [0, {count}), got {index!r}"
        )
    train = load_train(schema=schema)
    part = dirichlet_partition(labels=train.y, count=count, alpha=alpha, seed=seed)[index]
    return Dataset(x=train.x[part], y=train.y[part])


def check_dataset(*, x: np.ndarray, y: np.ndarray, schema: Schema | str, source: str) -> Dataset:
    """``x``/``y`` as a Dataset of ``schema``; raises DatasetError saying what does not fit."""
    schema = _schema(schema)
    x, y = np.asarray(x), np.asarray(y)

    def fail(reason: str) -> DatasetError:
        return DatasetError(source=source, reason=reason, schema=schema.key)

    if x.dtype.kind not in "iuf":
        raise fail(f"x must hold numbers, found dtype {x.dtype}")
    if y.dtype.kind not in "iuf":
        raise fail(f"y must hold integer labels, found dtype {y.dtype}")
    if x.ndim == 0 or len(x) == 0:
        raise fail("holds no samples")
    if y.ndim != 1:
        raise fail(f"y has shape {y.shape}; one integer label per sample, shape (n,), expected")
    if len(x) != len(y):
        raise fail(f"x has {len(x)} samples but y has {len(y)} labels")
    sample = x.shape[1:]
    if sample not in (schema.input_shape, (schema.num_features,)):
        raise fail(
            f"each sample has shape {sample} ({math.prod(sample)} values); schema "
            f"{schema.key!r} expects {schema.input_shape} ({schema.num_features} values)"
        )
    if not np.isfinite(x).all():
        raise fail("x holds NaN or infinite values")
    low, high = schema.value_range
    if x.min() < low or x.max() > high:
        raise fail(
            f"values range from {x.min():g} to {x.max():g}; schema {schema.key!r} expects "
            f"[{low:g}, {high:g}] (scale your data)"
        )
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.rint(y)).all()):
        raise fail("labels must be whole numbers")
    if y.min() < 0 or y.max() >= schema.num_classes:
        raise fail(
            f"labels range from {y.min():g} to {y.max():g}; schema {schema.key!r} has "
            f"classes 0 to {schema.num_classes - 1}"
        )
    return Dataset(
        x=x.astype(np.float32).reshape((len(x), *schema.input_shape)), y=y.astype(np.int64)
    )


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in ("x", "y") if name not in archive.files]
            if missing:
                raise DatasetError(
                    source=path.name,
                    reason=f"missing array(s) {missing}; found {sorted(archive.files)}",
                )
            return archive["x"], archive["y"]
    except (OSError, ValueError) as exc:
        # allow_pickle=False refuses object arrays: a data file must never run code.
        raise DatasetError(source=path.name, reason=f"not a readable .npz file: {exc}") from None


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open(encoding="utf-8", newline="") as handle:
        first = handle.readline().strip()
    cells = [cell.strip() for cell in first.split(",")]
    try:
        [float(cell) for cell in cells]
        header, label_column = False, 0
    except ValueError:
        names = [cell.strip("\"'").lower() for cell in cells]
        header, label_column = True, names.index("label") if "label" in names else 0
    try:
        table = np.loadtxt(
            path, delimiter=",", skiprows=int(header), ndmin=2, dtype=np.float64, encoding="utf-8"
        )
    except ValueError as exc:
        raise DatasetError(source=path.name, reason=f"not a numeric CSV table: {exc}") from None
    if table.shape[0] == 0:
        raise DatasetError(source=path.name, reason="holds no samples")
    return np.delete(table, label_column, axis=1), table[:, label_column]


def load_local(*, path: str | Path, schema: Schema | str) -> Dataset:
    """A device's own data: .npz with arrays x and y, or .csv with a label column (named
    "label" in a header row, else the first) and the features; checked against ``schema``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(source=str(path), reason="no such file")
    readers = {".npz": _read_npz, ".csv": _read_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DatasetError(
            source=path.name,
            reason=f"unsupported file type {path.suffix!r}; use .npz (arrays x, y) "
            "or .csv (label column + features)",
        )
    x, y = reader(path)
    return check_dataset(x=x, y=y, schema=schema, source=path.name)
