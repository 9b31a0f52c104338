"""A verified model blob in standard formats: a Keras ``.keras`` file and the weights as ``.npz``.

Each file is made from a blob already checked against its ID, then read back the way its user
will read it (``keras.saving.load_model``, ``numpy.load``) and its weights re-encoded under the
blob's own header: the file passes only if that gives the very ID the blob has, so what the
buyer loads is what the chain names. The canonical blob stays what is hashed; these are views.

Runs where TensorFlow may be imported (a subprocess of the web server, never the web process
itself): ``python -m training.export BLOB --spec SPEC.json --out DIR`` writes ``model.keras``,
``weights.npz`` and ``check.json`` into DIR, whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.errors import FlexError
from training.fixedpoint import quantize
from training.serialize import ModelBlob, decode, encode, id_hex, model_id
from training.spec import TaskSpec

KERAS_FILE = "model.keras"
NPZ_FILE = "weights.npz"
CHECK_FILE = "check.json"


class ExportCheckError(FlexError):
    """A converted file does not give back the model the chain names."""

    code = "export_check_failed"


def reencoded_id(model: ModelBlob, weights: Sequence[np.ndarray]) -> str:
    """The ID of ``weights`` in fixed point under ``model``'s header: ``model``'s own ID exactly
    when the weights are the model's."""
    values = quantize(weights, scale_bits=model.header.scale_bits)
    return id_hex(model_id(encode(model.header, values)))


def _checked(model: ModelBlob, weights: Sequence[np.ndarray], *, file: str) -> None:
    expected = id_hex(model.model_id)
    shapes = [tuple(np.shape(w)) for w in weights]
    if shapes != [v.shape for v in model.values]:
        raise ExportCheckError(
            f"{file} holds weights of shapes {shapes}, the model {list(model.header.shapes)}",
            file=file,
        )
    got = reencoded_id(model, weights)
    if got != expected:
        raise ExportCheckError(
            f"{file} re-encodes to {got}, not the model's ID {expected}", file=file, got=got
        )


def write_npz(model: ModelBlob, path: Path) -> None:
    """The weights as float32 arrays ``w0``, ``w1``, … in the order ``set_weights`` takes."""
    np.savez(path, **{f"w{i}": w for i, w in enumerate(model.floats())})
    with np.load(path, allow_pickle=False) as saved:
        _checked(model, [saved[f"w{i}"] for i in range(len(saved.files))], file=path.name)


def write_keras(model: ModelBlob, spec: TaskSpec, path: Path) -> None:
    """The model as a Keras file that loads without FLEX (plain Keras layers only)."""
    from training.catalogue import build_model

    keras_model = build_model(spec=spec)
    keras_model.set_weights(model.floats())
    keras_model.save(path)
    import keras

    loaded = keras.saving.load_model(path, compile=False)
    _checked(model, loaded.get_weights(), file=path.name)


def export(*, blob: bytes, spec: TaskSpec, out: Path) -> dict:
    """Write both files and their check record into ``out`` (replaced whole, or left as it
    was); returns the record. Raises a ModelBlobError for a bad blob, ExportCheckError."""
    model = decode(blob)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        write_npz(model, work / NPZ_FILE)
        write_keras(model, spec, work / KERAS_FILE)
        model_hex = id_hex(model.model_id)
        check = (
            "read back with {how}, its weights re-encoded in fixed point under the model's header"
            f" give {model_hex}, the model ID on chain"
        )
        record = {
            "model_id": model_hex,
            "task_id": model.header.task_id,
            "round": model.header.round_number,
            "checked_at": time.time(),
            "files": {
                "keras": {
                    "name": KERAS_FILE,
                    "check": check.format(how="keras.saving.load_model"),
                },
                "npz": {"name": NPZ_FILE, "check": check.format(how="numpy.load")},
            },
        }
        (work / CHECK_FILE).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.replace(work, out)  # an empty or missing ``out`` only: first writer wins
        except OSError:
            if not (out / CHECK_FILE).exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.export", description="Convert a model blob to .keras and .npz."
    )
    parser.add_argument("blob", type=Path, help="the model blob (.flexmodel)")
    parser.add_argument("--spec", type=Path, required=True, help="the task spec, as JSON")
    parser.add_argument("--id", required=True, help="the model ID the blob must have")
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    args = parser.parse_args(argv)
    try:
        blob = args.blob.read_bytes()
        decode(blob, expected_id=args.id)
        spec = TaskSpec.from_dict(json.loads(args.spec.read_text()))
        record = export(blob=blob, spec=spec, out=args.out)
    except (FlexError, OSError, ValueError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
