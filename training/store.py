"""A node's content-addressed model store: blob files named by model ID, indexed in SQLite.

Layout under the store's root::

    blobs/ab/ab12...ef      one file per blob, named by its ID in hex (no 0x), fanned out by
                            the first byte; never changed once in place
    blobs/ab/.tmp-*         a write in progress (or left by a crash); never read
    index.sqlite3           id, size, kind, task_id, round, created

A blob becomes visible only through os.replace of a complete, fsynced temp file in the same
directory, so a reader sees a whole blob or none, and a crash loses nothing already stored.
The files are the truth: ``has``/``get``/``open`` look at them, the index only describes them
(a crash between the rename and the index insert leaves an unindexed blob, which the next
``put`` of it or ``reindex()`` fills in). Several processes may share one store: renames are
atomic, identical content makes racing writers harmless, and SQLite serialises the index.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal

from eth_hash.auto import keccak

from training.errors import BlobNotFoundError, BlobTooLargeError, ModelIdMismatchError, StoreError
from training.serialize import id_hex, model_id, parse_id

Kind = Literal["global", "update"]
KINDS = ("global", "update")
DEFAULT_MAX_BLOB_BYTES = 1 << 30
CHUNK_BYTES = 1 << 20
TMP_PREFIX = ".tmp-"
# A temp file this old belongs to a writer that died; younger ones may still be in progress.
STALE_TMP_SECONDS = 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    id TEXT PRIMARY KEY,
    size INTEGER NOT NULL CHECK (size >= 0),
    kind TEXT CHECK (kind IN ('global', 'update')),
    task_id INTEGER,
    round INTEGER CHECK (round >= 0),
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS blobs_task_round ON blobs (task_id, round);
"""


@dataclass(frozen=True)
class StoredModel:
    """What the index knows of a blob; kind, task and round are None for a reindexed orphan."""

    model_id: bytes
    size: int
    kind: str | None
    task_id: int | None
    round_number: int | None
    created: datetime

    @property
    def id_hex(self) -> str:
        return id_hex(self.model_id)


class ModelStore:
    """Content-addressed blob store rooted at ``root`` (created if missing)."""

    def __init__(self, root: str | Path, *, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> None:
        self.root = Path(root)
        self.max_blob_bytes = max_blob_bytes
        self._blobs = self.root / "blobs"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._index = self.root / "index.sqlite3"
        with self._db() as db:
            # WAL lets readers in other processes go on while one process writes.
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # A connection per operation: safe across threads and forks, and cheap next to a blob.
        db = sqlite3.connect(self._index, timeout=30.0)
        try:
            with db:
                yield db
        finally:
            db.close()

    def path(self, model_id: bytes | str) -> Path:
        """Where the blob with this ID lives (whether or not it is there)."""
        digest = parse_id(model_id).hex()
        return self._blobs / digest[:2] / digest

    def has(self, model_id: bytes | str) -> bool:
        return self.path(model_id).is_file()

    def put(
        self,
        blob: bytes,
        *,
        kind: Kind | None = None,
        task_id: int | None = None,
        round_number: int | None = None,
        expected_id: bytes | str | None = None,
    ) -> bytes:
        """Store ``blob`` and return its model ID; storing the same blob again is a no-op.

        Raises BlobTooLargeError over the size limit, ModelIdMismatchError if ``expected_id``
        is given and the blob does not hash to it.
        """
        if len(blob) > self.max_blob_bytes:
            raise BlobTooLargeError(size=len(blob), limit=self.max_blob_bytes)
        digest = model_id(blob)
        if expected_id is not None and digest != (expected := parse_id(expected_id)):
            raise ModelIdMismatchError(expected=id_hex(expected), actual=id_hex(digest))
        return self._store(
            [blob], kind=kind, task_id=task_id, round_number=round_number, known_id=digest
        )

    def put_stream(
        self,
        chunks: Iterable[bytes],
        *,
        kind: Kind | None = None,
        task_id: int | None = None,
        round_number: int | None = None,
        expected_id: bytes | str | None = None,
    ) -> bytes:
        """Store a blob arriving in chunks (a peer's download), hashing it on the way in.

        Nothing is visible until the whole blob is on disk and its ID checked; a size limit
        breach stops the write as soon as it is seen. With ``expected_id`` of a blob already
        stored, ``chunks`` is not read at all. Without ``expected_id`` the temp file is written
        under blobs/incoming/ and renamed into place (same filesystem).
        """
        expected = None if expected_id is None else parse_id(expected_id)
        return self._store(
            chunks, kind=kind, task_id=task_id, round_number=round_number, expected=expected
        )

    def _store(
        self,
        chunks: Iterable[bytes],
        *,
        kind: Kind | None,
        task_id: int | None,
        round_number: int | None,
        expected: bytes | None = None,
        known_id: bytes | None = None,
    ) -> bytes:
        # ``known_id``: the caller already hashed these exact bytes, so skip a second pass.
        if kind is not None and kind not in KINDS:
            raise StoreError(f"kind must be one of {KINDS}, got {kind!r}", kind=kind)
        target = known_id or expected
        if target is not None and self.has(target):
            self._index_blob(target, kind=kind, task_id=task_id, round_number=round_number)
            return target
        tmp_dir = self._blobs / "incoming" if target is None else self.path(target).parent
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=tmp_dir)
        tmp = Path(tmp_name)
        try:
            hasher, size = (None if known_id else keccak.new(b"")), 0
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_blob_bytes:
                        raise BlobTooLargeError(size=size, limit=self.max_blob_bytes)
                    if hasher is not None:
                        hasher.update(chunk)
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            digest = known_id or hasher.digest()
            if expected is not None and digest != expected:
                raise ModelIdMismatchError(expected=id_hex(expected), actual=id_hex(digest))
            final = self.path(digest)
            final.parent.mkdir(exist_ok=True)
            # Blob files never change once in place; read-only says so to anyone on the host.
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._index_blob(digest, kind=kind, task_id=task_id, round_number=round_number, size=size)
        return digest

    def _index_blob(
        self,
        digest: bytes,
        *,
        kind: str | None,
        task_id: int | None,
        round_number: int | None,
        size: int | None = None,
    ) -> None:
        if size is None:
            size = self.path(digest).stat().st_size
        with self._db() as db:
            # The first description of a blob stays; later puts of the same bytes add nothing.
            db.execute(
                "INSERT OR IGNORE INTO blobs (id, size, kind, task_id, round, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (digest.hex(), size, kind, task_id, round_number, time.time()),
            )

    def get(self, model_id: bytes | str) -> bytes:
        """The blob's bytes, re-hashed against its ID (ModelIdMismatchError if the disk lies)."""
        expected = parse_id(model_id)
        try:
            blob = self.path(expected).read_bytes()
        except FileNotFoundError:
            raise BlobNotFoundError(model_id=id_hex(expected)) from None
        actual = keccak(blob)
        if actual != expected:
            raise ModelIdMismatchError(expected=id_hex(expected), actual=id_hex(actual))
        return blob

    def open(self, model_id: bytes | str, *, verify: bool = True) -> BinaryIO:
        """The blob as a binary file positioned at 0, for streaming in chunks.

        With ``verify`` the file is hashed first (one extra read); blob files are never
        rewritten in place, so what was verified is what the handle then reads.
        """
        expected = parse_id(model_id)
        try:
            handle = self.path(expected).open("rb")
        except FileNotFoundError:
            raise BlobNotFoundError(model_id=id_hex(expected)) from None
        if verify:
            hasher = keccak.new(b"")
            while chunk := handle.read(CHUNK_BYTES):
                hasher.update(chunk)
            if (actual := hasher.digest()) != expected:
                handle.close()
                raise ModelIdMismatchError(expected=id_hex(expected), actual=id_hex(actual))
            handle.seek(0)
        return handle

    def iter_chunks(
        self, model_id: bytes | str, *, chunk_bytes: int = CHUNK_BYTES
    ) -> Iterator[bytes]:
        """The verified blob in chunks of at most ``chunk_bytes``."""
        with self.open(model_id) as handle:
            while chunk := handle.read(chunk_bytes):
                yield chunk

    def info(self, model_id: bytes | str) -> StoredModel:
        """The index entry of a stored blob; BlobNotFoundError if the store has none."""
        digest = parse_id(model_id)
        with self._db() as db:
            row = db.execute(
                "SELECT id, size, kind, task_id, round, created FROM blobs WHERE id = ?",
                (digest.hex(),),
            ).fetchone()
        if row is None or not self.has(digest):
            raise BlobNotFoundError(model_id=id_hex(digest))
        return _stored(row)

    def list(
        self,
        *,
        kind: Kind | None = None,
        task_id: int | None = None,
        round_number: int | None = None,
    ) -> list[StoredModel]:
        """Indexed blobs matching the filters, oldest first."""
        clauses, params = [], []
        for column, value in (("kind", kind), ("task_id", task_id), ("round", round_number)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._db() as db:
            rows = db.execute(
                "SELECT id, size, kind, task_id, round, created FROM blobs"
                f"{where} ORDER BY created, id",
                params,
            ).fetchall()
        return [_stored(row) for row in rows]

    def reindex(self, *, remove_stale_tmp: bool = True) -> int:
        """Index blob files the index lacks (after a crash) and drop rows whose file is gone;
        remove temp files older than STALE_TMP_SECONDS. Returns the number of blobs added."""
        on_disk: dict[str, int] = {}
        cutoff = time.time() - STALE_TMP_SECONDS
        for path in self._blobs.glob("*/*"):
            if path.name.startswith(TMP_PREFIX):
                if remove_stale_tmp and path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
            elif len(path.name) == 64:
                on_disk[path.name] = path.stat().st_size
        with self._db() as db:
            indexed = {row[0] for row in db.execute("SELECT id FROM blobs")}
            missing = [(h, on_disk[h], time.time()) for h in on_disk.keys() - indexed]
            db.executemany(
                "INSERT OR IGNORE INTO blobs (id, size, created) VALUES (?, ?, ?)", missing
            )
            db.executemany(
                "DELETE FROM blobs WHERE id = ?", [(h,) for h in indexed - on_disk.keys()]
            )
        return len(missing)


def _stored(row: tuple) -> StoredModel:
    digest, size, kind, task_id, round_number, created = row
    return StoredModel(
        model_id=bytes.fromhex(digest),
        size=size,
        kind=kind,
        task_id=task_id,
        round_number=round_number,
        created=datetime.fromtimestamp(created, tz=UTC),
    )


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; without it a power cut could forget the new name.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
