"""Model blobs for tests: weights written in the canonical format under a header of choice."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from training.fixedpoint import quantize
from training.serialize import ZERO_ADDRESS, Header, Kind, encode

CHAIN_ID = 31337
CONTRACT = "0x" + "c0" * 20
TRAINER = "0x" + "a1" * 20


def header_for(
    values: Sequence[np.ndarray],
    *,
    kind: Kind = Kind.UPDATE,
    task_id: int = 1,
    round_number: int = 0,
    trainer: str | None = None,
    chain_id: int = CHAIN_ID,
    contract: str = CONTRACT,
    chunk_values: int = 256,
) -> Header:
    """A header for ``values``; an update's trainer defaults to TRAINER, a global's is zero."""
    if trainer is None:
        trainer = TRAINER if kind == Kind.UPDATE else ZERO_ADDRESS
    return Header(
        kind=kind,
        chain_id=chain_id,
        contract=contract,
        task_id=task_id,
        round_number=round_number,
        trainer=trainer,
        shapes=tuple(np.shape(v) for v in values),
        chunk_values=chunk_values,
    )


def blob_of(weights: Sequence[np.ndarray], **header: object) -> bytes:
    """The blob of ``weights`` (float weights are quantized first) under ``header_for``."""
    values = [
        np.asarray(w) if np.asarray(w).dtype == np.int32 else quantize([w])[0] for w in weights
    ]
    return encode(header_for(values, **header), values)
