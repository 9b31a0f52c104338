"""Import boundaries: the web app and the chain side can load training without TensorFlow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIGHT = (
    "training",
    "training.errors",
    "training.spec",
    "training.catalogue",
    "training.serialize",
    "training.fixedpoint",
    "training.merkle",
    "training.verifier",
    "training.store",
    "training.datasets",
    "training.aggregation",
)


def loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return {name.split(".")[0] for name in out.stdout.split()}


def test_light_modules_do_not_import_tensorflow():
    loaded = loaded_after("\n".join(f"import {name}" for name in LIGHT))
    assert set(LIGHT[:1]) <= loaded  # the check ran on real imports
    assert "tensorflow" not in loaded
    assert "keras" not in loaded


def test_spec_and_catalogue_do_not_import_sklearn_either():
    # The web app imports these on every start; the bundled data loader is for devices.
    loaded = loaded_after("import training.spec, training.catalogue")
    assert "sklearn" not in loaded
    assert "tensorflow" not in loaded


def test_building_a_model_does_import_keras():
    # The counterpart: the check above would notice if Keras came in through these imports.
    loaded = loaded_after(
        "from training.catalogue import build_model\n"
        "from training.spec import TaskSpec\n"
        "build_model(spec=TaskSpec(model='digits-mlp', dataset='digits-8x8', rounds=1))"
    )
    assert "keras" in loaded
    assert "tensorflow" in loaded
