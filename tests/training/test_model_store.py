"""The content-addressed model store: IDs verified, writes atomic, crashes and races harmless."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from eth_utils import keccak

from tests import blobs
from training import merkle
from training import store as store_module
from training.errors import (
    BlobHeaderError,
    BlobNotFoundError,
    BlobTooLargeError,
    ChunkMismatchError,
    ModelBlobError,
    ModelIdMismatchError,
    StoreError,
)
from training.serialize import Kind, Openings, id_hex, model_id, parse_id
from training.store import STALE_TMP_SECONDS, TMP_PREFIX, ChunkOutOfRangeError, ModelStore

ROOT = Path(__file__).resolve().parents[2]
OTHER = "0x" + "b2" * 20


def blob_of(value: float, size: int = 100, **header) -> bytes:
    return blobs.blob_of([np.full(size, value, dtype=np.float32)], **header)


def temp_files(store: ModelStore) -> list[Path]:
    return [p for p in (store.root / "blobs").rglob(f"{TMP_PREFIX}*")]


def blob_files(store: ModelStore) -> list[Path]:
    return [
        p
        for p in (store.root / "blobs").glob("*/*")
        if not p.name.startswith(TMP_PREFIX) and p.is_file()
    ]


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def test_put_get_round_trip(store):
    blob = blob_of(1.0, kind=Kind.GLOBAL, task_id=2**64 - 1, round_number=0)
    digest = store.put(blob)
    assert digest == model_id(blob)
    assert store.has(digest)
    assert store.has(id_hex(digest))
    assert store.get(digest) == blob
    assert store.get(id_hex(digest)) == blob
    assert store.load(digest).model_id == digest
    info = store.info(digest)
    assert (info.size, info.kind, info.task_id, info.round_number) == (
        len(blob),
        "global",
        2**64 - 1,
        0,
    )
    assert (info.chain_id, info.contract.lower()) == (blobs.CHAIN_ID, blobs.CONTRACT)
    assert info.trainer == "0x" + "00" * 20
    assert info.created.tzinfo is UTC
    assert info.id_hex == id_hex(digest)
    assert store.path(digest).name == digest.hex()


def test_the_header_files_a_blob_and_equal_weights_of_two_tasks_are_two_blobs(store):
    first = store.put(blob_of(2.0, kind=Kind.GLOBAL, task_id=1))
    second = store.put(blob_of(2.0, kind=Kind.GLOBAL, task_id=2))
    assert first != second
    assert [m.model_id for m in store.list(task_id=1)] == [first]
    assert [m.model_id for m in store.list(task_id=2)] == [second]
    assert store.put(blob_of(2.0, kind=Kind.GLOBAL, task_id=1)) == first  # idempotent
    assert len(store.list()) == 2
    assert len(blob_files(store)) == 2


def test_bytes_that_are_not_a_model_are_refused(store):
    with pytest.raises(BlobHeaderError):
        store.put(b"trainer update bytes")
    with pytest.raises(BlobHeaderError):
        store.put_stream([b"trainer ", b"update bytes"])
    assert store.list() == []
    assert blob_files(store) == []
    assert temp_files(store) == []


def test_list_filters(store):
    a = store.put(blob_of(1.0, kind=Kind.GLOBAL, task_id=1, round_number=0))
    b = store.put(blob_of(2.0, task_id=1, round_number=0))
    c = store.put(blob_of(3.0, task_id=1, round_number=1))
    d = store.put(blob_of(4.0, task_id=2, round_number=0, trainer=OTHER))
    e = store.put(blob_of(4.0, task_id=2, round_number=0, trainer=OTHER, chain_id=1))
    ids = lambda **kw: {m.model_id for m in store.list(**kw)}  # noqa: E731
    assert ids() == {a, b, c, d, e}
    assert ids(kind="update") == {b, c, d, e}
    assert ids(task_id=1, round_number=0) == {a, b}
    assert ids(task_id=1, kind="update", round_number=1) == {c}
    assert ids(trainer=OTHER.upper().replace("0X", "0x")) == {d, e}
    assert ids(trainer=OTHER, chain_id=blobs.CHAIN_ID, contract=blobs.CONTRACT) == {d}
    assert ids(task_id=3) == set()


def test_tasks_say_when_each_last_stored_a_blob(store, monkeypatch):
    clock = iter([1000.0, 3000.0, 2000.0, 5000.0])
    # The store's clock alone: time.time itself is read by every thread of the process.
    monkeypatch.setattr(store_module, "time", SimpleNamespace(time=lambda: next(clock)))
    store.put(blob_of(1.0, task_id=1, round_number=0))
    store.put(blob_of(2.0, task_id=1, round_number=1))
    store.put(blob_of(3.0, task_id=2))
    store.put(blob_of(4.0, task_id=3, contract=OTHER))
    found = store.tasks(
        chain_id=blobs.CHAIN_ID, contract=blobs.CONTRACT.upper().replace("0X", "0x")
    )
    assert {t: when.timestamp() for t, when in found.items()} == {1: 3000.0, 2: 2000.0}
    assert all(when.tzinfo is UTC for when in found.values())
    assert store.tasks(chain_id=1, contract=blobs.CONTRACT) == {}


def test_remove_deletes_the_files_and_their_rows_and_skips_what_is_not_there(store):
    a = store.put(blob_of(1.0, task_id=1))
    b = store.put(blob_of(2.0, task_id=1, round_number=1))
    c = store.put(blob_of(3.0, task_id=2))
    sizes = store.info(a).size + store.info(b).size
    absent = keccak(b"never stored")
    assert store.remove([id_hex(a), b, absent]) == sizes
    assert not store.has(a)
    assert not store.has(b)
    assert [m.model_id for m in store.list()] == [c]
    assert store.usage() == (1, store.info(c).size)
    assert {p.name for p in blob_files(store)} == {c.hex()}
    with pytest.raises(BlobNotFoundError):
        store.get(a)
    assert store.remove([a, b]) == 0
    # Stored again, a removed blob is whole and listed again.
    assert store.put(blob_of(1.0, task_id=1)) == a
    assert store.load(a).header.task_id == 1
    assert len(store.list(task_id=1)) == 1


def test_a_remove_cut_short_after_the_files_is_finished_by_the_next(store):
    """The files go first: one gone while its row stays is denied by the store at once, and
    the row is dropped by the next remove of it."""
    a = store.put(blob_of(1.0))
    store.path(a).unlink()
    assert not store.has(a)
    with pytest.raises(BlobNotFoundError):
        store.info(a)
    assert store.remove([a]) == 0
    assert store.list() == []


def test_missing_blob(store):
    absent = keccak(b"nothing")
    assert not store.has(absent)
    with pytest.raises(BlobNotFoundError) as exc:
        store.get(absent)
    assert id_hex(absent) in str(exc.value)
    with pytest.raises(BlobNotFoundError):
        store.open(absent)
    with pytest.raises(BlobNotFoundError):
        store.info(absent)


def test_bad_ids_are_refused(store):
    with pytest.raises(ModelBlobError):
        store.get("0x1234")
    with pytest.raises(ModelBlobError):
        store.has(b"short")


def corrupt(store: ModelStore, digest: bytes) -> None:
    path = store.path(digest)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_get_load_and_open_verify_the_blob(store):
    digest = store.put(blob_of(5.0))
    corrupt(store, digest)
    with pytest.raises(ChunkMismatchError) as exc:
        store.get(digest)
    assert exc.value.index == 0
    with pytest.raises(ChunkMismatchError):
        store.load(digest)
    with pytest.raises(ChunkMismatchError):
        store.open(digest)
    with store.open(digest, verify=False) as handle:  # an explicit opt-out still reads
        assert handle.read(8) == b"FLEXMDL2"
    # A blob file under another model's name fails the ID check.
    other = store.put(blob_of(6.0))
    store.path(other).chmod(0o644)
    store.path(other).write_bytes(blob_of(7.0))
    with pytest.raises(ModelIdMismatchError) as mismatch:
        store.get(other)
    assert mismatch.value.expected == id_hex(other)


def test_open_streams_in_chunks(store):
    blob = blob_of(6.0, size=100_000)
    digest = store.put(blob)
    chunks = list(store.iter_chunks(digest, chunk_bytes=4096))
    assert len(chunks) == -(-len(blob) // 4096)
    assert b"".join(chunks) == blob
    with store.open(digest) as handle:
        assert handle.read() == blob


def test_one_chunk_opens_against_the_id_without_the_rest(store):
    rng = np.random.default_rng(3)
    raw = blobs.blob_of([rng.normal(size=(40, 33)).astype(np.float32)], chunk_values=64)
    digest = store.put(raw)
    whole = store.load(digest)
    for index in (0, 7, whole.header.leaf_count - 1):
        opened = store.opening(digest, index)
        assert opened == whole.opening(index)
        assert opened.check(digest) == whole.header
        assert np.array_equal(opened.array(), whole.values[0].reshape(-1)[64 * index :][:64])
    # Several at once, in the order asked, from one read of the leaves.
    last = whole.header.leaf_count - 1
    assert store.openings(digest, [last, 0, last]) == [whole.opening(i) for i in (last, 0, last)]
    with pytest.raises(ChunkOutOfRangeError) as past:
        store.openings(digest, [0, whole.header.leaf_count])
    assert past.value.index == whole.header.leaf_count
    # An opening is checked against the ID it is asked for: a changed file, a chunk under
    # another index or another model's ID are all refused.
    other = store.put(blob_of(1.0))
    with pytest.raises(ModelIdMismatchError):
        store.opening(digest, 0).check(other)
    moved = store.opening(digest, 1)
    with pytest.raises(ChunkMismatchError):
        type(moved)(**{**moved.__dict__, "index": 2}).check(digest)
    corrupt(store, digest)  # the last value's byte
    store.opening(digest, 0)  # the other chunks still open
    with pytest.raises(ChunkMismatchError):
        store.opening(digest, whole.header.leaf_count - 1)
    with pytest.raises(ChunkMismatchError):
        store.openings(digest, [0, whole.header.leaf_count - 1])
    with pytest.raises(ChunkMismatchError):
        store.opened(digest, [0, whole.header.leaf_count - 1])


def test_a_models_tree_is_made_once_and_its_chunks_still_checked_each_time(store, monkeypatch):
    digest = store.put(blobs.blob_of([np.arange(1000, dtype=np.float32)], chunk_values=64))
    last = store.load(digest).opening(15)
    made = []
    levels = merkle.levels
    monkeypatch.setattr(merkle, "levels", lambda leaves: made.append(len(leaves)) or levels(leaves))
    first = store.opened(digest, [0, 5])
    assert store.opened(digest, [0, 5]) == first
    assert store.openings(digest, [15]) == [last]
    assert made == [16]  # one tree, however many requests
    # A chunk changed on disk since is still refused: every chunk read is hashed.
    corrupt(store, digest)
    with pytest.raises(ChunkMismatchError):
        store.opened(digest, [15])
    # Kept by the hashes they hold: with room for 40, trees of 31 are kept one at a time.
    monkeypatch.setattr(store_module, "KEPT_TREE_HASHES", 40)
    fresh = ModelStore(store.root)
    others = [store.put(blob_of(float(k), size=1000, chunk_values=64)) for k in range(3)]
    for other in [digest, *others]:
        fresh.opened(other, [0])
    assert len(fresh._trees()) == 1
    assert fresh._trees().get(parse_id(others[-1])) is not None


def test_many_chunks_open_with_one_proof_as_bytes_and_check_against_the_id(store):
    raw = blobs.blob_of([np.arange(1000, dtype=np.float32)], chunk_values=64)
    digest = store.put(raw)
    whole = store.load(digest)
    leaf_count = whole.header.leaf_count  # 16
    for asked in ([3], [15, 0, 15], [5, 4, 9], list(range(leaf_count))):
        opened = store.opened(digest, asked)
        assert len(opened.proof) == merkle.multiproof_size(leaf_count, asked)
        packed = opened.pack() + b"next"
        read, end = Openings.unpack(packed, 0, asked)
        assert (read, packed[end:]) == (opened, b"next")
        assert read.check(digest) == [whole.opening(i) for i in asked]
    assert store.opened(digest, range(leaf_count)).proof == ()
    with pytest.raises(ChunkOutOfRangeError):
        store.opened(digest, [leaf_count])
    # What a peer could send instead, each refused naming what is wrong.
    packed = store.opened(digest, [1, 2]).pack()
    for cut, message in ((3, "a header's length"), (60, "a header"), (len(packed) - 1, "chunk 2")):
        with pytest.raises(ValueError, match=f"ends inside {message}"):
            Openings.unpack(packed[:cut], 0, [1, 2])
    with pytest.raises(ValueError, match="proof of 4 hashes where the chunks take 5"):
        Openings.unpack(packed, 0, [1, 4])
    with pytest.raises(ValueError, match=f"asked of a model of {leaf_count}"):
        Openings.unpack(packed, 0, [1, leaf_count])
    with pytest.raises(ValueError, match="bad magic"):
        Openings.unpack(packed[:4] + b"X" + packed[5:], 0, [1, 2])
    other = store.put(blob_of(1.0))
    with pytest.raises(ModelIdMismatchError):
        Openings.unpack(packed, 0, [1, 2])[0].check(other)
    with pytest.raises(ModelIdMismatchError):
        Openings.unpack(packed, 0, [2, 1])[0].check(digest)  # the chunks under each other's index
    twice = store.opened(digest, [1, 1])
    changed = ((1, twice.chunks[0][1]), (1, bytes(len(twice.chunks[1][1]))))
    with pytest.raises(ChunkMismatchError, match="chunk 1 does not match"):
        replace(twice, chunks=changed).check(digest)


def test_blob_files_are_read_only(store):
    digest = store.put(blob_of(7.0))
    assert store.path(digest).stat().st_mode & 0o222 == 0


def test_size_limit(tmp_path):
    store = ModelStore(tmp_path / "small", max_blob_bytes=500)
    store.put(blob_of(1.0, size=10))
    with pytest.raises(BlobTooLargeError) as exc:
        store.put(blob_of(1.0, size=1000))
    assert exc.value.limit == 500
    big = blob_of(1.0, size=1000)
    with pytest.raises(BlobTooLargeError):  # the header declares too much: stops at once
        store.put_stream(big[i : i + 200] for i in range(0, len(big), 200))
    assert len(store.list()) == 1
    assert temp_files(store) == []


def test_put_with_wrong_expected_id_stores_nothing(store):
    blob = blob_of(1.0)
    with pytest.raises(ModelIdMismatchError):
        store.put(blob, expected_id=model_id(blob_of(2.0)))
    assert not store.has(model_id(blob))
    assert store.list() == []


def test_put_stream_checks_the_id_before_anything_is_visible(store):
    blob = blob_of(8.0, size=10_000)
    chunks = [blob[i : i + 1000] for i in range(0, len(blob), 1000)]
    wrong = model_id(blob_of(9.0))
    with pytest.raises(ModelIdMismatchError):
        store.put_stream(iter(chunks), expected_id=wrong)
    assert not store.has(wrong)
    assert not store.has(model_id(blob))
    assert temp_files(store) == []
    assert store.put_stream(iter(chunks), expected_id=model_id(blob)) == model_id(blob)
    assert store.put_stream(iter(chunks)) == model_id(blob)  # no expected ID: header decides
    assert store.get(model_id(blob)) == blob


def test_put_stream_stops_at_a_bad_chunk_and_keeps_nothing(store):
    blob = bytearray(blob_of(8.0, size=10_000))
    blob[-5] ^= 1
    with pytest.raises(ChunkMismatchError):
        store.put_stream(bytes(blob[i : i + 1000]) for i in range(0, len(blob), 1000))
    assert store.list() == []
    assert blob_files(store) == []
    assert temp_files(store) == []


def test_invalid_kind(store):
    with pytest.raises(StoreError, match="kind must be"):
        store.list(kind="final")


def test_an_index_of_an_older_format_is_rebuilt_from_the_blobs(tmp_path):
    root = tmp_path / "old"
    (root / "blobs").mkdir(parents=True)
    with sqlite3.connect(root / "index.sqlite3") as db:
        db.execute("CREATE TABLE blobs (id TEXT PRIMARY KEY, size INTEGER, kind TEXT)")
        db.execute("INSERT INTO blobs VALUES ('ab', 1, 'update')")
    blob = blob_of(1.0, task_id=4)
    digest = model_id(blob)
    (root / "blobs" / digest.hex()[:2]).mkdir()
    (root / "blobs" / digest.hex()[:2] / digest.hex()).write_bytes(blob)
    v1 = keccak(b"a v1 blob")
    (root / "blobs" / v1.hex()[:2]).mkdir(exist_ok=True)
    (root / "blobs" / v1.hex()[:2] / v1.hex()).write_bytes(b"FLEXMODL\x01\x00")
    store = ModelStore(root)
    assert [(m.model_id, m.task_id) for m in store.list()] == [(digest, 4)]


def test_failure_mid_write_leaves_nothing_visible(store, monkeypatch):
    kept = store.put(blob_of(1.0))
    blob = blob_of(2.0)

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        store.put(blob)
    monkeypatch.undo()
    assert not store.has(model_id(blob))
    assert temp_files(store) == []
    assert store.get(kept) == blob_of(1.0)
    assert store.put(blob) == model_id(blob)


def child_code(store: ModelStore, body: str) -> str:
    preamble = f"""
        import os
        import numpy as np
        from tests.blobs import blob_of
        from training.store import ModelStore
        store = ModelStore({str(store.root)!r})
        """
    return textwrap.dedent(preamble) + textwrap.dedent(body)


def run_child(store: ModelStore, body: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", child_code(store, body)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_crash_mid_write_loses_nothing_and_shows_nothing(store):
    kept = store.put(blob_of(1.0, kind=Kind.GLOBAL))
    # The child dies hard (no cleanup, no finally) after writing the data but before the
    # rename: exactly what a power cut or kill -9 mid-write leaves behind.
    child = run_child(
        store,
        """
        def die(fd):
            os._exit(9)
        os.fsync = die
        store.put(blob_of([np.full(100, 2.0, dtype=np.float32)]))
        """,
    )
    assert child.returncode == 9, child.stderr
    crashed = model_id(blob_of(2.0))
    assert not store.has(crashed)
    assert [m.model_id for m in store.list()] == [kept]
    assert store.get(kept) == blob_of(1.0, kind=Kind.GLOBAL)
    leftovers = temp_files(store)
    assert len(leftovers) == 1  # the half-written file exists, but only under a temp name
    # A young temp file may belong to a live writer: reindex keeps it; an old one goes.
    store.reindex()
    assert temp_files(store) == leftovers
    old = time.time() - STALE_TMP_SECONDS - 60
    os.utime(leftovers[0], (old, old))
    assert store.reindex() == 0
    assert temp_files(store) == []
    assert store.put(blob_of(2.0)) == crashed


def test_crash_between_rename_and_index_is_repaired(store):
    child = run_child(
        store,
        """
        def die(*args, **kwargs):
            os._exit(9)
        ModelStore._index_blob = die
        store.put(blob_of([np.full(100, 3.0, dtype=np.float32)], round_number=6))
        """,
    )
    assert child.returncode == 9, child.stderr
    blob = blob_of(3.0, round_number=6)
    digest = model_id(blob)
    assert store.get(digest) == blob  # the files are the truth
    assert store.list() == []
    assert store.reindex() == 1
    (entry,) = store.list()
    assert (entry.model_id, entry.size, entry.kind) == (digest, len(blob), "update")
    assert entry.round_number == 6  # read from the blob's own header


def test_reindex_drops_rows_whose_file_is_gone(store):
    digest = store.put(blob_of(4.0))
    store.path(digest).unlink()
    store.reindex()
    assert store.list() == []


def test_concurrent_puts_from_threads(store):
    made = [blob_of(float(i % 3)) for i in range(24)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = list(pool.map(store.put, made))
    assert ids == [model_id(b) for b in made]
    assert len(store.list()) == 3
    assert len(blob_files(store)) == 3
    assert temp_files(store) == []


def test_concurrent_puts_from_processes(store):
    body = """
        shared = blob_of([np.full(200_000, 9.0, dtype=np.float32)], kind=0)
        for i in range(20):
            digest = store.put(shared)
            store.put(blob_of([np.full(10, float(i), dtype=np.float32)]))
            assert store.get(digest) == shared
        """
    children = [
        subprocess.Popen(
            [sys.executable, "-c", child_code(store, body)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    shared = blob_of(9.0, size=200_000, kind=Kind.GLOBAL)
    assert store.get(model_id(shared)) == shared
    assert len(store.list()) == 21
    assert [m.model_id for m in store.list(kind="global")] == [model_id(shared)]
    assert len(blob_files(store)) == 21
    assert temp_files(store) == []


def test_two_handles_on_one_store_see_each_other(tmp_path):
    first, second = ModelStore(tmp_path / "s"), ModelStore(tmp_path / "s")
    digest = first.put(blob_of(1.0, kind=Kind.GLOBAL))
    assert second.get(digest) == blob_of(1.0, kind=Kind.GLOBAL)
    assert second.info(digest).kind == "global"


def _forked_child_puts(store: ModelStore, value: float, seen: multiprocessing.Queue) -> None:
    store.put(blob_of(value))
    seen.put(sorted(m.id_hex for m in store.list()))


def test_a_forked_child_writes_through_its_parents_store_and_the_parent_goes_on(store):
    # A worker's pool forks after the node opened its store: parent and child index blobs
    # in the same file, each over a connection of its own, and neither breaks the other.
    before = store.put(blob_of(1.0))
    context = multiprocessing.get_context("fork")
    seen = context.Queue()
    child = context.Process(target=_forked_child_puts, args=(store, 2.0, seen))
    child.start()
    during = store.put(blob_of(3.0))
    in_child = seen.get(timeout=120)
    child.join(timeout=120)
    assert child.exitcode == 0
    assert id_hex(before) in in_child
    assert id_hex(model_id(blob_of(2.0))) in in_child
    after = store.put(blob_of(4.0))
    assert {m.model_id for m in store.list()} == {
        before,
        during,
        model_id(blob_of(2.0)),
        after,
    }
    assert ModelStore(store.root).info(after).size == len(blob_of(4.0))
