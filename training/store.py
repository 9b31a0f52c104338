"""A node's content-addressed model store: blob files named by model ID, indexed in SQLite.

Layout under the store's root::

    blobs/ab/ab12...ef      one file per blob, named by its ID in hex (no 0x), fanned out by
                            the first byte; never changed once in place
    blobs/ab/.tmp-*         a write in progress (or left by a crash); never read
    index.sqlite3           id, size, and what the blob's own header says it is: kind,
                            chain_id, contract, task_id, round, trainer; created

Only well-formed model blobs (training.serialize) are stored, and the index describes each
by its header alone: the same bytes cannot be filed under two tasks, rounds or authors.

A blob becomes visible only through os.replace of a complete, fsynced temp file in the same
directory, so a reader sees a whole blob or none, and a crash loses nothing already stored.
The files are the truth: ``has``/``get``/``open`` look at them, the index only describes them
(a crash between the rename and the index insert leaves an unindexed blob, which the next
``put`` of it or ``reindex()`` fills in from its header). Several processes may share one
store: renames are atomic, identical content makes racing writers harmless, and SQLite
serialises the index.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal

import cachetools

from core.addresses import checksum_address
from training import merkle
from training.errors import (
    BlobNotFoundError,
    BlobTooLargeError,
    BlobTruncatedError,
    ChunkMismatchError,
    ModelBlobError,
    ModelIdMismatchError,
    StoreError,
)
from training.serialize import (
    ChunkOpening,
    Header,
    Kind,
    ModelBlob,
    Openings,
    decode,
    id_hex,
    id_of,
    parse_id,
    read_header,
)
from training.verifier import BlobVerifier

KindName = Literal["global", "update"]
KIND_NAMES = {Kind.GLOBAL: "global", Kind.UPDATE: "update"}
DEFAULT_MAX_BLOB_BYTES = 1 << 30
CHUNK_BYTES = 1 << 20
TMP_PREFIX = ".tmp-"
# A temp file this old belongs to a writer that died; younger ones may still be in progress.
STALE_TMP_SECONDS = 3600.0

# Bumped when the index's columns change; an older index is rebuilt from the blob files.
SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    id TEXT PRIMARY KEY,
    size INTEGER NOT NULL CHECK (size >= 0),
    kind TEXT NOT NULL CHECK (kind IN ('global', 'update')),
    chain_id TEXT NOT NULL,
    contract TEXT NOT NULL,
    task_id TEXT NOT NULL,
    round INTEGER NOT NULL CHECK (round >= 0),
    trainer TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS blobs_task_round ON blobs (task_id, round);
"""
_COLUMNS = "id, size, kind, chain_id, contract, task_id, round, trainer, created"
# Enough bytes for any ordinary header; a longer one is read on (reindex only).
_HEADER_PROBE = 64 * 1024


@dataclass(frozen=True)
class StoredModel:
    """What the index knows of a blob: its size and what its header says it is."""

    model_id: bytes
    size: int
    kind: KindName
    chain_id: int
    contract: str
    task_id: int
    round_number: int
    trainer: str
    created: datetime

    @property
    def id_hex(self) -> str:
        return id_hex(self.model_id)


# The Merkle trees a process keeps of the models whose chunks it opened last, by the hashes
# they hold (32 bytes each, about 70 in memory): about 70 MiB, a round's updates of 128
# trainers of a model of a million values, whose every request for chunks would otherwise
# hash each named model's whole tree again.
KEPT_TREE_HASHES = 1 << 20

_Tree = tuple[bytes, Header, list[list[bytes]]]


class _KeptTrees:
    """The header and Merkle tree of the models opened most recently, checked against their
    IDs, up to ``most`` hashes in all; shared by a process's threads."""

    def __init__(self, most: int) -> None:
        self._trees = cachetools.LRUCache(
            maxsize=most, getsizeof=lambda tree: sum(len(level) for level in tree[2])
        )
        self._lock = threading.Lock()

    def get(self, model_id: bytes) -> _Tree | None:
        with self._lock:
            return self._trees.get(model_id)

    def keep(self, model_id: bytes, tree: _Tree) -> None:
        with self._lock, contextlib.suppress(ValueError):  # one tree larger than them all
            self._trees[model_id] = tree

    def __len__(self) -> int:
        return len(self._trees)


class ChunkOutOfRangeError(IndexError):
    """A chunk past a model's last."""

    def __init__(self, index: int, count: int) -> None:
        super().__init__(f"chunk {index} of {count}")
        self.index = index


class ModelStore:
    """Content-addressed blob store rooted at ``root`` (created if missing)."""

    def __init__(self, root: str | Path, *, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> None:
        self.root = Path(root)
        self.max_blob_bytes = max_blob_bytes
        self._blobs = self.root / "blobs"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._index = self.root / "index.sqlite3"
        self._connections: dict[int, tuple[threading.Lock, sqlite3.Connection]] = {}
        self._kept_trees: dict[int, _KeptTrees] = {}
        with self._db() as db:
            # WAL lets readers in other processes go on while one process writes.
            db.execute("PRAGMA journal_mode=WAL")
            # One process at a time decides whether the index is current, and rebuilds it.
            db.execute("BEGIN IMMEDIATE")
            stale = db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION
            if stale:
                db.execute("DROP TABLE IF EXISTS blobs")
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if stale:
            self.reindex(remove_stale_tmp=False)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """The index in a transaction of its own (committed on the way out), over this
        process's connection: opened once, not per operation, since closing the last one
        checkpoints the write-ahead log into the index and deletes it, and the next opening
        creates it again. The process's threads take turns on it; a forked child opens its
        own (a connection must not cross a fork) and leaves its parent's alone."""
        pid = os.getpid()
        held = self._connections.get(pid)
        if held is None:
            connection = sqlite3.connect(self._index, timeout=30.0, check_same_thread=False)
            # The files are the truth and the index only describes them, so a commit need
            # not wait for the disk: in WAL mode this loses no row to a crash of the process,
            # and a power cut at worst the newest rows, which reindex() and the next put of
            # the blob fill in again, as after a crash between a rename and its insert.
            connection.execute("PRAGMA synchronous=NORMAL")
            held = self._connections[pid] = (threading.Lock(), connection)
        lock, db = held
        with lock, db:
            yield db

    def path(self, model_id: bytes | str) -> Path:
        """Where the blob with this ID lives (whether or not it is there)."""
        digest = parse_id(model_id).hex()
        return self._blobs / digest[:2] / digest

    def has(self, model_id: bytes | str) -> bool:
        return self.path(model_id).is_file()

    def put(self, blob: bytes, *, expected_id: bytes | str | None = None) -> bytes:
        """Store a model blob and return its ID; storing the same blob again is a no-op.

        Raises BlobTooLargeError over the size limit, a ModelBlobError subclass for a blob that
        is malformed or (with ``expected_id``) another model's.
        """
        if len(blob) > self.max_blob_bytes:
            raise BlobTooLargeError(size=len(blob), limit=self.max_blob_bytes)
        model = decode(blob, expected_id=expected_id)
        return self._store([blob], header=model.header, known_id=model.model_id)

    def put_stream(
        self, chunks: Iterable[bytes], *, expected_id: bytes | str | None = None
    ) -> bytes:
        """Store a blob arriving in pieces (a peer's download), checking it on the way in.

        Nothing is visible until the whole blob is on disk and checked; a malformed header, a
        wrong ID, a bad chunk or a size limit breach stops the write as soon as it is seen.
        With ``expected_id`` of a blob already stored, ``chunks`` is not read at all.
        """
        expected = None if expected_id is None else parse_id(expected_id)
        if expected is not None and self.has(expected):
            self._index_blob(expected)
            return expected
        return self._store(chunks, verifier=BlobVerifier(expected_id=expected))

    def _store(
        self,
        chunks: Iterable[bytes],
        *,
        header: Header | None = None,
        known_id: bytes | None = None,
        verifier: BlobVerifier | None = None,
    ) -> bytes:
        # Either ``known_id`` and ``header`` of bytes already checked, or a ``verifier``.
        if known_id is not None and self.has(known_id):
            self._index_blob(known_id, header=header)
            return known_id
        tmp_dir = self._blobs / "incoming" if known_id is None else self.path(known_id).parent
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=tmp_dir)
        tmp = Path(tmp_name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_blob_bytes:
                        raise BlobTooLargeError(size=size, limit=self.max_blob_bytes)
                    if verifier is not None:
                        verifier.feed(chunk)
                        if verifier.size is not None and verifier.size > self.max_blob_bytes:
                            raise BlobTooLargeError(size=verifier.size, limit=self.max_blob_bytes)
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            if verifier is not None:
                known_id, header = verifier.finish(), verifier.header
            final = self.path(known_id)
            final.parent.mkdir(exist_ok=True)
            # Blob files never change once in place; read-only says so to anyone on the host.
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._index_blob(known_id, header=header, size=size)
        return known_id

    def _index_blob(
        self, digest: bytes, *, header: Header | None = None, size: int | None = None
    ) -> None:
        path = self.path(digest)
        if header is None:
            header = _read_file_header(path)
        if size is None:
            size = path.stat().st_size
        with self._db() as db:
            db.execute(
                f"INSERT OR IGNORE INTO blobs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _row(digest, size, header, time.time()),
            )

    def get(self, model_id: bytes | str) -> bytes:
        """The blob's bytes, checked whole against its ID (a ModelBlobError if the disk lies)."""
        expected = parse_id(model_id)
        try:
            blob = self.path(expected).read_bytes()
        except FileNotFoundError:
            raise BlobNotFoundError(model_id=id_hex(expected)) from None
        decode(blob, expected_id=expected)
        return blob

    def load(self, model_id: bytes | str) -> ModelBlob:
        """The decoded blob, checked against its ID."""
        expected = parse_id(model_id)
        try:
            blob = self.path(expected).read_bytes()
        except FileNotFoundError:
            raise BlobNotFoundError(model_id=id_hex(expected)) from None
        return decode(blob, expected_id=expected)

    def open(self, model_id: bytes | str, *, verify: bool = True) -> BinaryIO:
        """The blob as a binary file positioned at 0, for streaming in chunks.

        With ``verify`` the file is checked first (one extra read); blob files are never
        rewritten in place, so what was verified is what the handle then reads.
        """
        expected = parse_id(model_id)
        try:
            handle = self.path(expected).open("rb")
        except FileNotFoundError:
            raise BlobNotFoundError(model_id=id_hex(expected)) from None
        if verify:
            verifier = BlobVerifier(expected_id=expected)
            try:
                while chunk := handle.read(CHUNK_BYTES):
                    verifier.feed(chunk)
                verifier.finish()
            except BaseException:
                handle.close()
                raise
            handle.seek(0)
        return handle

    def iter_chunks(
        self, model_id: bytes | str, *, chunk_bytes: int = CHUNK_BYTES
    ) -> Iterator[bytes]:
        """The verified blob in chunks of at most ``chunk_bytes``."""
        with self.open(model_id) as handle:
            while chunk := handle.read(chunk_bytes):
                yield chunk

    def opening(self, model_id: bytes | str, index: int) -> ChunkOpening:
        """Chunk ``index`` of a stored blob with its header, root and Merkle path, read without
        loading the rest of the values; ChunkOutOfRangeError for a chunk past the last."""
        return self.openings(model_id, [index])[0]

    def openings(self, model_id: bytes | str, indexes: Sequence[int]) -> list[ChunkOpening]:
        """``opening`` of each chunk in ``indexes``, in that order, from one read of the
        header and leaves and one Merkle tree; ChunkOutOfRangeError for a chunk past the last."""
        header, tree, chunks = self._read_chunks(model_id, indexes)
        return [
            ChunkOpening(
                index=index,
                header=header,
                root=tree[-1][0],
                values=values,
                siblings=tuple(merkle.proof_in(tree, index)),
            )
            for index, values in zip(indexes, chunks, strict=True)
        ]

    def opened(self, model_id: bytes | str, indexes: Sequence[int]) -> Openings:
        """Chunks ``indexes`` in that order with one proof for them all, as a data plane
        serves them; ChunkOutOfRangeError for a chunk past the last."""
        header, tree, chunks = self._read_chunks(model_id, indexes)
        return Openings(
            header=header,
            chunks=tuple(zip(indexes, chunks, strict=True)),
            proof=tuple(merkle.multiproof_in(tree, indexes)),
        )

    def _read_chunks(
        self, model_id: bytes | str, indexes: Sequence[int]
    ) -> tuple[bytes, list[list[bytes]], list[bytes]]:
        """The header's bytes, the Merkle tree and chunks ``indexes`` of a stored blob, read
        without the rest of its values and each checked against the ID it is stored under.
        The tree is made from the blob's leaves and checked against its ID once, then kept
        (_KeptTrees): a watcher's next request for chunks of the same model hashes only the
        chunks it reads."""
        expected = parse_id(model_id)
        kept = self._trees().get(expected)
        with self.open(expected, verify=False) as handle:
            if kept is None:
                head = handle.read(_HEADER_PROBE)
                while (parsed := read_header(head)) is None:
                    more = handle.read(_HEADER_PROBE)
                    if not more:
                        raise BlobTruncatedError(
                            f"model blob {id_hex(expected)} ends in its header"
                        )
                    head += more
                header, length = parsed
                handle.seek(length)
                listed = handle.read(32 * header.leaf_count)
                tree = merkle.levels([listed[i : i + 32] for i in range(0, len(listed), 32)])
                head = head[:length]
            else:
                head, header, tree = kept
            for index in indexes:
                if not 0 <= index < header.leaf_count:
                    raise ChunkOutOfRangeError(index, header.leaf_count)
            values_at = len(head) + 32 * header.leaf_count
            chunks = []
            for index in indexes:
                handle.seek(values_at + 4 * index * header.chunk_values)
                chunks.append(handle.read(4 * header.chunk_size(index)))
        # The file is not trusted: its leaves must make the ID it is stored under, and each
        # chunk read must be its leaf's.
        if kept is None:
            if (actual := id_of(head, tree[-1][0])) != expected:
                raise ModelIdMismatchError(expected=id_hex(expected), actual=id_hex(actual))
            self._trees().keep(expected, (head, header, tree))
        for index, values in zip(indexes, chunks, strict=True):
            if merkle.leaf(values) != tree[0][index]:
                raise ChunkMismatchError(index=index)
        return head, tree, chunks

    def _trees(self) -> _KeptTrees:
        """This process's kept trees (a forked child starts with none of its own)."""
        pid = os.getpid()
        if (kept := self._kept_trees.get(pid)) is None:
            kept = self._kept_trees[pid] = _KeptTrees(KEPT_TREE_HASHES)
        return kept

    def info(self, model_id: bytes | str) -> StoredModel:
        """The index entry of a stored blob; BlobNotFoundError if the store has none."""
        digest = parse_id(model_id)
        with self._db() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM blobs WHERE id = ?", (digest.hex(),)
            ).fetchone()
        if row is None or not self.has(digest):
            raise BlobNotFoundError(model_id=id_hex(digest))
        return _stored(row)

    def list(
        self,
        *,
        kind: KindName | None = None,
        chain_id: int | None = None,
        contract: str | None = None,
        task_id: int | None = None,
        round_number: int | None = None,
        trainer: str | None = None,
    ) -> list[StoredModel]:
        """Indexed blobs matching the filters, oldest first."""
        if kind is not None and kind not in KIND_NAMES.values():
            raise StoreError(f"kind must be 'global' or 'update', got {kind!r}", kind=kind)
        filters = (
            ("kind", kind),
            ("chain_id", None if chain_id is None else str(chain_id)),
            ("contract", None if contract is None else contract.lower()),
            ("task_id", None if task_id is None else str(task_id)),
            ("round", round_number),
            ("trainer", None if trainer is None else trainer.lower()),
        )
        clauses = [f"{column} = ?" for column, value in filters if value is not None]
        params = [value for _, value in filters if value is not None]
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._db() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM blobs{where} ORDER BY created, id", params
            ).fetchall()
        return [_stored(row) for row in rows]

    def tasks(self, *, chain_id: int, contract: str) -> dict[int, datetime]:
        """The tasks of FlexMarket ``contract`` on chain ``chain_id`` that the index holds
        blobs of, each with when the newest of them was stored."""
        with self._db() as db:
            rows = db.execute(
                "SELECT task_id, MAX(created) FROM blobs WHERE chain_id = ? AND contract = ?"
                " GROUP BY task_id",
                (str(chain_id), contract.lower()),
            ).fetchall()
        return {int(task): datetime.fromtimestamp(newest, tz=UTC) for task, newest in rows}

    def usage(self) -> tuple[int, int]:
        """How many blobs the index holds, and their bytes."""
        with self._db() as db:
            count, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs"
            ).fetchone()
        return count, size

    def remove(self, model_ids: Iterable[bytes | str]) -> int:
        """Delete these blobs, skipping any the store does not hold; returns the bytes freed.
        The files go first, as they are the truth: a crash before their index rows follow
        leaves rows that ``has`` and ``info`` already deny, and that the next ``remove`` of
        the same IDs or ``reindex()`` drops."""
        digests = [parse_id(m) for m in model_ids]
        freed = 0
        for digest in digests:
            path = self.path(digest)
            with contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size
                path.unlink()
                freed += size
        with self._db() as db:
            db.executemany("DELETE FROM blobs WHERE id = ?", [(d.hex(),) for d in digests])
        return freed

    def reindex(self, *, remove_stale_tmp: bool = True) -> int:
        """Index blob files the index lacks (after a crash), from their headers, and drop rows
        whose file is gone; files that are not model blobs stay out of the index. Removes temp
        files older than STALE_TMP_SECONDS. Returns the number of blobs added."""
        on_disk: dict[str, Path] = {}
        cutoff = time.time() - STALE_TMP_SECONDS
        for path in self._blobs.glob("*/*"):
            if path.name.startswith(TMP_PREFIX):
                if remove_stale_tmp and path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
            elif len(path.name) == 64:
                on_disk[path.name] = path
        with self._db() as db:
            indexed = {row[0] for row in db.execute("SELECT id FROM blobs")}
        added = []
        for name in on_disk.keys() - indexed:
            try:
                header = _read_file_header(on_disk[name])
            except ModelBlobError:
                continue
            size = on_disk[name].stat().st_size
            added.append(_row(bytes.fromhex(name), size, header, time.time()))
        with self._db() as db:
            db.executemany(
                f"INSERT OR IGNORE INTO blobs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                added,
            )
            db.executemany(
                "DELETE FROM blobs WHERE id = ?", [(h,) for h in indexed - on_disk.keys()]
            )
        return len(added)


def _read_file_header(path: Path) -> Header:
    """The header of the blob file at ``path``, read without the values."""
    with path.open("rb") as handle:
        data = handle.read(_HEADER_PROBE)
        while (parsed := read_header(data)) is None:
            more = handle.read(_HEADER_PROBE)
            if not more:
                raise BlobTruncatedError(f"{path.name}: the file ends inside the model header")
            data += more
    return parsed[0]


def _row(digest: bytes, size: int, header: Header, created: float) -> tuple:
    return (
        digest.hex(),
        size,
        KIND_NAMES[header.kind],
        str(header.chain_id),
        header.contract.lower(),
        str(header.task_id),
        header.round_number,
        header.trainer.lower(),
        created,
    )


def _stored(row: tuple) -> StoredModel:
    digest, size, kind, chain_id, contract, task_id, round_number, trainer, created = row
    return StoredModel(
        model_id=bytes.fromhex(digest),
        size=size,
        kind=kind,
        chain_id=int(chain_id),
        contract=checksum_address(contract),
        task_id=int(task_id),
        round_number=round_number,
        trainer=checksum_address(trainer),
        created=datetime.fromtimestamp(created, tz=UTC),
    )


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; without it a power cut could forget the new name.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
