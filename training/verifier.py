"""Checking a model blob as it streams in: the ID before any value, then each chunk on arrival.

A blob opens with its header and leaf hashes, so once those are in, the ID is known and
checked against the one expected; each chunk of values that follows is then checked against
its own leaf as soon as it is whole, and the first bad one stops the transfer with its index.
Nothing but the header, the leaves and one partial chunk is held.
"""

from __future__ import annotations

from training import merkle
from training.errors import (
    BlobTooLongError,
    BlobTruncatedError,
    ChunkMismatchError,
    ModelIdMismatchError,
)
from training.serialize import Header, id_hex, id_of, parse_id, read_header


class BlobVerifier:
    """Feed a blob's bytes in any pieces with ``feed``; ``finish`` when they end.

    ``feed`` raises BlobHeaderError (malformed header), ModelIdMismatchError (the header and
    leaves name another model than ``expected_id``), ChunkMismatchError (a chunk does not match
    its leaf) or BlobTooLongError (bytes past the declared end); ``finish`` raises
    BlobTruncatedError when the blob stopped short. ``header``, ``size`` (the declared length
    of the whole blob) and ``model_id`` are set as soon as the bytes that decide them are in.
    """

    def __init__(self, *, expected_id: bytes | str | None = None) -> None:
        self.expected_id = None if expected_id is None else parse_id(expected_id)
        self.header: Header | None = None
        self.size: int | None = None
        self.model_id: bytes | None = None
        self.received = 0
        self._buffer = bytearray()
        self._header_bytes = b""
        self._leaves: list[bytes] = []
        self._next_chunk = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes of the blob and check whatever they complete."""
        self.received += len(data)
        self._buffer += data
        if self.header is None and not self._read_header():
            return
        if self.received > self.size:
            raise BlobTooLongError(
                f"malformed model blob: {self.received - self.size} bytes after the last value",
                declared=self.size,
                available=self.received,
            )
        if self.model_id is None and not self._read_leaves():
            return
        self._check_chunks()

    def finish(self) -> bytes:
        """The blob's model ID, once every byte it declares has arrived and checked."""
        if self.size is None or self.received < self.size:
            raise BlobTruncatedError(
                f"model blob truncated: {self.received} bytes of "
                f"{self.size if self.size is not None else 'a header not yet complete'}",
                declared=self.size,
                available=self.received,
            )
        return self.model_id

    def _read_header(self) -> bool:
        parsed = read_header(self._buffer)
        if parsed is None:
            return False
        self.header, length = parsed
        self.size = self.header.size()
        self._header_bytes = bytes(self._buffer[:length])
        del self._buffer[:length]
        return True

    def _read_leaves(self) -> bool:
        need = 32 * self.header.leaf_count
        if len(self._buffer) < need:
            return False
        listed = bytes(self._buffer[:need])
        del self._buffer[:need]
        self._leaves = [listed[i : i + 32] for i in range(0, need, 32)]
        actual = id_of(self._header_bytes, merkle.root(self._leaves))
        if self.expected_id is not None and actual != self.expected_id:
            raise ModelIdMismatchError(expected=id_hex(self.expected_id), actual=id_hex(actual))
        self.model_id = actual
        return True

    def _check_chunks(self) -> None:
        header = self.header
        while self._next_chunk < header.leaf_count:
            size = 4 * header.chunk_size(self._next_chunk)
            if len(self._buffer) < size:
                return
            if merkle.leaf(self._buffer[:size]) != self._leaves[self._next_chunk]:
                raise ChunkMismatchError(index=self._next_chunk)
            # Deleting from the front of a bytearray is cheap in CPython (no shifting).
            del self._buffer[:size]
            self._next_chunk += 1
