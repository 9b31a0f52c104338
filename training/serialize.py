"""The canonical model format v2 and model IDs: fixed-point values in chunks under a Merkle root.

docs/verifiable.md is the spec. A blob is ``header ‖ leaves ‖ data`` (big-endian)::

    magic FLEXMDL2 · version u16 = 2 · kind u8 · scale_bits u8 · chunk_values u32 ·
    chain_id u64 · contract 20 bytes · task_id u64 · round u32 · trainer 20 bytes ·
    count u64 · tensors u16 · per tensor: ndim u8, dims ndim x u32
    leaves: keccak256(0x00 ‖ chunk_i), 32 bytes each, one per chunk of chunk_values values
    data:   the count values as int32, tensor after tensor, C order

and its ID is ``keccak256(0x02 ‖ keccak256(header) ‖ merkle_root(leaves))``. The header names
the chain, contract, task, round and (for an update) the trainer, so equal weights written for
two tasks or by two trainers are two models with two IDs.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from eth_utils import is_address, to_checksum_address

from core.hashing import keccak
from training import merkle
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
from training.fixedpoint import SCALE_BITS, dequantize

MAGIC = b"FLEXMDL2"
VERSION = 2
CHUNK_VALUES = 256
# Readers refuse larger chunks: a streaming check holds one chunk in memory at a time.
MAX_CHUNK_VALUES = 1 << 16
MAX_NDIM = 8
MAX_TENSORS = (1 << 16) - 1
ZERO_ADDRESS = "0x" + "00" * 20
ID_PREFIX = b"\x02"
VALUE = np.dtype(">i4")
_FIXED = struct.Struct(">8sHBBIQ20sQI20sQH")
_U64 = 1 << 64


class Kind(IntEnum):
    GLOBAL = 0
    UPDATE = 1


def _address(value: str | bytes, name: str) -> str:
    if isinstance(value, bytes | bytearray) and len(value) == 20:
        return _checksummed(bytes(value))
    if isinstance(value, str) and is_address(value):
        return _checksummed(value)
    raise BlobHeaderError(f"model header {name} is not a 20-byte address: {value!r}")


@functools.lru_cache(maxsize=4096)
def _checksummed(value: str | bytes) -> str:
    # A node reads the same few addresses in every header it checks: a keccak each time.
    return to_checksum_address(value)


@dataclass(frozen=True)
class Header:
    """What a model is: kind, chain, contract, task, round, author, fixed-point layout, shapes."""

    kind: Kind
    chain_id: int
    contract: str
    task_id: int
    round_number: int
    shapes: tuple[tuple[int, ...], ...]
    trainer: str = ZERO_ADDRESS
    scale_bits: int = SCALE_BITS
    chunk_values: int = CHUNK_VALUES
    count: int = field(init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        try:
            set_(self, "kind", Kind(self.kind))
        except ValueError:
            raise BlobHeaderError(f"model header kind {self.kind!r}: 0 or 1 expected") from None
        set_(self, "contract", _address(self.contract, "contract"))
        set_(self, "trainer", _address(self.trainer, "trainer"))
        set_(self, "shapes", tuple(tuple(int(d) for d in s) for s in self.shapes))
        for name, value, bound in (
            ("chain_id", self.chain_id, _U64),
            ("task_id", self.task_id, _U64),
            ("round", self.round_number, 1 << 32),
            ("scale_bits", self.scale_bits, 1 << 8),
        ):
            if not 0 <= value < bound:
                raise BlobHeaderError(f"model header {name} {value} is out of range")
        if not 1 <= self.chunk_values <= MAX_CHUNK_VALUES:
            raise BlobHeaderError(
                f"model header chunk_values {self.chunk_values}: 1..{MAX_CHUNK_VALUES} expected"
            )
        if (self.kind == Kind.UPDATE) == (self.trainer == ZERO_ADDRESS):
            raise BlobHeaderError(
                "model header trainer: an update names its author, a global model the zero address"
            )
        if not 1 <= len(self.shapes) <= MAX_TENSORS:
            raise BlobHeaderError(f"model header: {len(self.shapes)} tensors, 1..{MAX_TENSORS}")
        for shape in self.shapes:
            if len(shape) > MAX_NDIM or any(not 0 <= d < 1 << 32 for d in shape):
                raise BlobHeaderError(f"model header: tensor shape {shape} cannot be written")
        count = sum(math.prod(s) for s in self.shapes)
        if not 1 <= count < _U64:
            raise BlobHeaderError(f"model header: {count} values; a model has 1 to 2^64 - 1")
        set_(self, "count", count)

    @property
    def leaf_count(self) -> int:
        """``L``: the number of chunks (and leaves)."""
        return -(-self.count // self.chunk_values)

    def chunk_size(self, index: int) -> int:
        """Values in chunk ``index`` (the last may be short)."""
        if not 0 <= index < self.leaf_count:
            raise IndexError(f"chunk {index} of {self.leaf_count}")
        return min(self.chunk_values, self.count - index * self.chunk_values)

    def pack(self) -> bytes:
        """The header's bytes, exactly as they open the blob."""
        parts = [
            _FIXED.pack(
                MAGIC,
                VERSION,
                self.kind,
                self.scale_bits,
                self.chunk_values,
                self.chain_id,
                bytes.fromhex(self.contract[2:]),
                self.task_id,
                self.round_number,
                bytes.fromhex(self.trainer[2:]),
                self.count,
                len(self.shapes),
            )
        ]
        for shape in self.shapes:
            parts.append(struct.pack(f">B{len(shape)}I", len(shape), *shape))
        return b"".join(parts)

    def size(self) -> int:
        """Bytes of the whole blob this header opens."""
        return len(self.pack()) + 32 * self.leaf_count + 4 * self.count

    def check(self, expected: Header) -> None:
        """Raise the HeaderMismatchError subclass for the first field that differs from
        ``expected``: kind, then chain/contract/task, round, author, layout."""
        checks = (
            (WrongKindError, "kind", lambda h: h.kind.name.lower()),
            (WrongTaskError, "chain", lambda h: h.chain_id),
            (WrongTaskError, "contract", lambda h: h.contract),
            (WrongTaskError, "task", lambda h: h.task_id),
            (WrongModelRoundError, "round", lambda h: h.round_number),
            (WrongAuthorError, "trainer", lambda h: h.trainer),
            (WrongLayoutError, "scale_bits", lambda h: h.scale_bits),
            (WrongLayoutError, "chunk_values", lambda h: h.chunk_values),
            (WrongLayoutError, "shapes", lambda h: h.shapes),
        )
        for error, name, get in checks:
            if get(self) != get(expected):
                raise error(field=name, expected=get(expected), actual=get(self))


def read_header(buffer: bytes | bytearray | memoryview) -> tuple[Header, int] | None:
    """The header opening ``buffer`` and its length, or None while ``buffer`` is too short to
    hold it all. A prefix that can already be seen to be wrong raises BlobHeaderError."""
    view = memoryview(buffer)
    if bytes(view[:8]) != MAGIC[: min(8, len(view))]:
        raise BlobHeaderError("malformed model blob header: not a FLEX model blob (bad magic)")
    if len(view) >= 10 and (version := int.from_bytes(view[8:10], "big")) != VERSION:
        raise BlobHeaderError(
            f"malformed model blob header: format version {version}, this node reads {VERSION}"
        )
    if len(view) < _FIXED.size:
        return None
    fields = _FIXED.unpack(view[: _FIXED.size])
    offset, shapes = _FIXED.size, []
    for _ in range(fields[-1]):
        if len(view) < offset + 1:
            return None
        ndim = view[offset]
        if ndim > MAX_NDIM:
            raise BlobHeaderError(f"malformed model blob header: a tensor of {ndim} dimensions")
        if len(view) < offset + 1 + 4 * ndim:
            return None
        shapes.append(struct.unpack_from(f">{ndim}I", view, offset + 1))
        offset += 1 + 4 * ndim
    _, _, kind, scale, chunk, chain, contract, task, rnd, trainer, count, _ = fields
    try:
        header = Header(
            kind=kind,
            chain_id=chain,
            contract=contract,
            task_id=task,
            round_number=rnd,
            shapes=tuple(shapes),
            trainer=trainer,
            scale_bits=scale,
            chunk_values=chunk,
        )
    except BlobHeaderError as exc:
        raise BlobHeaderError(f"malformed model blob header: {exc.message}") from None
    if header.count != count:
        raise BlobHeaderError(
            f"malformed model blob header: count {count}, the shapes hold {header.count}"
        )
    return header, offset


def id_of(header: bytes, root: bytes) -> bytes:
    """A model ID from its header's bytes and its Merkle root."""
    return keccak(ID_PREFIX + keccak(header) + root)


def leaves_of(data: bytes | memoryview, *, chunk_values: int) -> list[bytes]:
    """The leaf hash of each chunk of ``data`` (the values' big-endian bytes)."""
    view, step = memoryview(data), 4 * chunk_values
    return [merkle.leaf(view[start : start + step]) for start in range(0, len(view), step)]


@dataclass(frozen=True, eq=False)
class ModelBlob:
    """A decoded, verified blob: its header, int32 values (read-only), leaves, root and ID."""

    header: Header
    values: list[np.ndarray]
    leaves: list[bytes]
    root: bytes
    model_id: bytes

    def floats(self) -> list[np.ndarray]:
        """The values as float32 weights."""
        return dequantize(self.values, scale_bits=self.header.scale_bits)

    @functools.cached_property
    def data(self) -> bytes:
        """The values' bytes as the blob holds them (made on first use)."""
        return b"".join(v.astype(VALUE).tobytes() for v in self.values)

    def chunk(self, index: int) -> bytes:
        """The bytes of chunk ``index``, as hashed into its leaf."""
        start = 4 * index * self.header.chunk_values
        return self.data[start : start + 4 * self.header.chunk_size(index)]

    @functools.cached_property
    def tree(self) -> list[list[bytes]]:
        """Every level of the model's Merkle tree (made on first use, once for all proofs)."""
        return merkle.levels(self.leaves)

    def proof(self, index: int) -> list[bytes]:
        """The Merkle proof of chunk ``index`` against ``root``."""
        return merkle.proof_in(self.tree, index)

    def opening(self, index: int) -> ChunkOpening:
        """Chunk ``index`` with what ties it to this model's ID."""
        return ChunkOpening(
            index=index,
            header=self.header.pack(),
            root=self.root,
            values=self.chunk(index),
            siblings=tuple(self.proof(index)),
        )


@dataclass(frozen=True)
class ChunkOpening:
    """One chunk of a model with what ties it to the model's ID: the header's bytes, the
    Merkle root, the chunk's values (int32, big-endian) and its path to the root. What a
    watcher fetches instead of a whole model, and what a fraud proof sends the contract."""

    index: int
    header: bytes
    root: bytes
    values: bytes
    siblings: tuple[bytes, ...]

    def check(self, model_id: bytes | str) -> Header:
        """The model's header, once the opening is shown to be chunk ``index`` of
        ``model_id``; ModelIdMismatchError or ChunkMismatchError otherwise."""
        head, actual = _opened_model(self.header, self.root)
        expected = parse_id(model_id)
        if actual != expected:
            raise ModelIdMismatchError(expected=id_hex(expected), actual=id_hex(actual))
        if not _chunk_holds(
            head, root=self.root, index=self.index, chunk=self.values, proof=self.siblings
        ):
            raise ChunkMismatchError(index=self.index)
        return head

    def array(self) -> np.ndarray:
        """The chunk's values as int32."""
        return np.frombuffer(self.values, dtype=VALUE).astype(np.int32)


@functools.lru_cache(maxsize=1024)
def _opened_model(header: bytes, root: bytes) -> tuple[Header, bytes]:
    """The header and ID that an opening's header bytes and root make: the same for every
    chunk of a model, which a watcher checks by the dozen."""
    return _opened_header(header), id_of(header, root)


@functools.lru_cache(maxsize=1024)
def _opened_header(header: bytes) -> Header:
    """The header of an opening's header bytes, which must be one whole header;
    BlobHeaderError otherwise."""
    parsed = read_header(header)
    if parsed is None or parsed[1] != len(header):
        raise BlobHeaderError("malformed model blob header in a chunk opening")
    return parsed[0]


_LENGTH = struct.Struct(">I")


@dataclass(frozen=True)
class Openings:
    """Chunks of one model with one proof for them all: the header's bytes, each chunk's
    index and values (in the order asked) and the hashes that, with the chunks' leaves,
    make the model's Merkle root (merkle.multiproof_in): for every chunk of a model, none.
    What a data plane serves for several chunks at once (``pack``); ``check`` ties them to
    the model's ID and gives each chunk's ChunkOpening, with its own proof."""

    header: bytes
    chunks: tuple[tuple[int, bytes], ...]
    proof: tuple[bytes, ...]

    def pack(self) -> bytes:
        """``len(header) u32 ‖ header ‖ len(proof) u32 ‖ proof ‖ each chunk's values``: the
        indexes are the asker's, and each chunk's size is the header's."""
        return b"".join(
            [
                _LENGTH.pack(len(self.header)),
                self.header,
                _LENGTH.pack(len(self.proof)),
                *self.proof,
                *(values for _, values in self.chunks),
            ]
        )

    @classmethod
    def unpack(
        cls, data: bytes | memoryview, offset: int, indexes: Sequence[int]
    ) -> tuple[Openings, int]:
        """The openings of chunks ``indexes`` packed in ``data`` at ``offset``, and where they
        end. ValueError, naming what is wrong, for bytes that are not those openings: a
        header that is not one, a chunk past the model's last, a proof of another length
        than the chunks take, or too few bytes."""
        view = memoryview(data)

        def take(size: int, what: str) -> bytes:
            nonlocal offset
            if offset + size > len(view):
                raise ValueError(f"the answer ends inside {what}")
            offset += size
            return bytes(view[offset - size : offset])

        header = take(_LENGTH.unpack(take(4, "a header's length"))[0], "a header")
        try:
            head = _opened_header(header)
        except BlobHeaderError as exc:
            raise ValueError(exc.message) from None
        if not all(0 <= i < head.leaf_count for i in indexes):
            raise ValueError(f"chunks {list(indexes)[:8]} asked of a model of {head.leaf_count}")
        count = _LENGTH.unpack(take(4, "a proof's length"))[0]
        if count != (expected := merkle.multiproof_size(head.leaf_count, indexes)):
            raise ValueError(f"a proof of {count} hashes where the chunks take {expected}")
        proof = tuple(take(32, "a proof") for _ in range(count))
        chunks = tuple((i, take(4 * head.chunk_size(i), f"chunk {i}")) for i in indexes)
        return cls(header=header, chunks=chunks, proof=proof), offset

    def check(self, model_id: bytes | str) -> list[ChunkOpening]:
        """Each chunk's opening, in order, once the chunks and proof are shown to make
        ``model_id``: ChunkMismatchError for a chunk that is not the size its header says (or
        a chunk given twice, differently), ModelIdMismatchError for any that was changed or is
        another model's."""
        head = _opened_header(self.header)
        leaves: dict[int, bytes] = {}
        for index, values in self.chunks:
            if not 0 <= index < head.leaf_count or len(values) != 4 * head.chunk_size(index):
                raise ChunkMismatchError(index=index)
            if leaves.setdefault(index, leaf := merkle.leaf(values)) != leaf:
                raise ChunkMismatchError(index=index)
        tree = merkle.multiproof_levels(head.leaf_count, leaves, self.proof)
        root, expected = tree[-1][0], parse_id(model_id)
        if (actual := id_of(self.header, root)) != expected:
            raise ModelIdMismatchError(expected=id_hex(expected), actual=id_hex(actual))
        return [
            ChunkOpening(
                index=index,
                header=self.header,
                root=root,
                values=values,
                siblings=tuple(tree[h][(index >> h) ^ 1] for h in range(len(tree) - 1)),
            )
            for index, values in self.chunks
        ]


def encode(header: Header, values: Sequence[np.ndarray]) -> bytes:
    """The canonical bytes of int32 ``values`` under ``header`` (whose shapes they must have)."""
    arrays = [np.asarray(v) for v in values]
    for index, array in enumerate(arrays):
        if array.dtype.kind != "i" or array.dtype.itemsize != 4:
            raise BlobDtypeError(
                f"tensor {index} has dtype {array.dtype}; a model blob holds int32 fixed point"
                " (quantize float weights first)",
                tensor=index,
                dtype=str(array.dtype),
            )
    shapes = tuple(a.shape for a in arrays)
    if shapes != header.shapes:
        raise BlobHeaderError(f"values of shapes {shapes} under a header for {header.shapes}")
    data = b"".join(a.astype(VALUE, copy=False).tobytes(order="C") for a in arrays)
    leaves = leaves_of(data, chunk_values=header.chunk_values)
    return b"".join([header.pack(), *leaves, data])


def decode(
    blob: bytes | bytearray | memoryview, *, expected_id: bytes | str | None = None
) -> ModelBlob:
    """Parse and check a whole blob; raises a ModelBlobError subclass saying what is wrong."""
    view = memoryview(blob)
    parsed = read_header(view)
    if parsed is None:
        raise BlobTruncatedError(
            f"model blob truncated: ends at byte {len(view)} inside the header", size=len(view)
        )
    header, offset = parsed
    declared = header.size()
    if len(view) < declared:
        raise BlobTruncatedError(
            f"model blob truncated: header declares {declared} bytes, {len(view)} present",
            declared=declared,
            available=len(view),
        )
    if len(view) > declared:
        raise BlobTooLongError(
            f"malformed model blob: {len(view) - declared} bytes after the last value",
            declared=declared,
            available=len(view),
        )
    data_start = offset + 32 * header.leaf_count
    # As a streaming check does: the ID from the listed leaves, then each chunk against its leaf.
    listed = bytes(view[offset:data_start])
    leaves = [listed[i : i + 32] for i in range(0, len(listed), 32)]
    root = merkle.root(leaves)
    actual = id_of(bytes(view[:offset]), root)
    if expected_id is not None and actual != (expected := parse_id(expected_id)):
        raise ModelIdMismatchError(expected=id_hex(expected), actual=id_hex(actual))
    hashed = leaves_of(view[data_start:], chunk_values=header.chunk_values)
    if hashed != leaves:
        bad = next(i for i, (a, b) in enumerate(zip(hashed, leaves, strict=True)) if a != b)
        raise ChunkMismatchError(index=bad)
    values, position = [], data_start
    for shape in header.shapes:
        size = math.prod(shape)
        big = np.frombuffer(view, dtype=VALUE, count=size, offset=position)
        native = big.astype(np.int32).reshape(shape)
        native.flags.writeable = False
        values.append(native)
        position += 4 * size
    return ModelBlob(header=header, values=values, leaves=leaves, root=root, model_id=actual)


def model_id(blob: bytes | bytearray | memoryview) -> bytes:
    """The bytes32 ID of a well-formed blob (which is checked whole)."""
    return decode(blob).model_id


def verify_chunk(
    *,
    model_id: bytes | str,
    header: bytes,
    root: bytes,
    index: int,
    chunk: bytes,
    proof: Sequence[bytes],
) -> bool:
    """Whether ``chunk`` is chunk ``index`` of the model ``model_id``, given the model's header
    bytes, Merkle root and the chunk's proof: what a contract checks in a dispute."""
    parsed = read_header(header)
    if parsed is None or parsed[1] != len(header) or id_of(header, root) != parse_id(model_id):
        return False
    return _chunk_holds(parsed[0], root=root, index=index, chunk=chunk, proof=proof)


def _chunk_holds(
    head: Header, *, root: bytes, index: int, chunk: bytes, proof: Sequence[bytes]
) -> bool:
    """Whether ``chunk`` is chunk ``index`` of a model of header ``head`` and Merkle ``root``."""
    if not 0 <= index < head.leaf_count or len(chunk) != 4 * head.chunk_size(index):
        return False
    return merkle.verify(
        leaf_hash=merkle.leaf(chunk),
        index=index,
        siblings=proof,
        root_hash=root,
        leaf_count=head.leaf_count,
    )


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
