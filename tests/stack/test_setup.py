"""The set-up `make run` and `make test` share refuses a machine without what FLEX needs, by
name and before installing anything: Node.js 18+ with npm."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NPM = shutil.which("npm")
OUTER_MAKE = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"}


def npm_set_up(tmp_path: Path, *, node_version: str | None, npm: bool = True):
    """`make node_modules/.installed` in a copy of the project's make and npm files, with
    nothing on the PATH but a `node` that says it is ``node_version`` (None: no node) and,
    with ``npm``, the real npm (the recipe needs only `touch` and its shell's builtins
    besides)."""
    for name in ("Makefile", "package.json", "package-lock.json"):
        shutil.copy(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if node_version is not None:
        (bin_dir / "node").write_text(f"#!/bin/sh\necho {node_version}\n")
        (bin_dir / "node").chmod(0o755)
    if npm and NPM:
        (bin_dir / "npm").symlink_to(NPM)
    (bin_dir / "touch").symlink_to(shutil.which("touch"))
    return subprocess.run(
        [shutil.which("make"), "node_modules/.installed"],
        cwd=tmp_path,
        # Not a sub-make of the one running the suite: none of its flags, nor its
        # "Entering directory" lines.
        env={k: v for k, v in os.environ.items() if k not in OUTER_MAKE} | {"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    ("node_version", "npm", "found"),
    [
        ("v16.20.2", True, "node v16.20.2, npm {bin}/npm"),
        (None, True, "node none, npm {bin}/npm"),
        ("v20.19.0", False, "node v20.19.0, npm none"),
        ("not a version", True, "node not a version, npm {bin}/npm"),
    ],
)
def test_set_up_refuses_a_machine_without_node_18_and_npm(tmp_path, node_version, npm, found):
    done = npm_set_up(tmp_path, node_version=node_version, npm=npm)

    assert done.returncode != 0
    assert done.stdout.strip() == (
        "error: FLEX needs Node.js 18+ with npm (found: " + found.format(bin=tmp_path / "bin") + ")"
    )
    assert not (tmp_path / "node_modules").exists()  # nothing installed


@pytest.mark.parametrize("node_version", ["v18.0.0", "v20.19.0", "v24.1.0"])
def test_set_up_installs_with_node_18_or_later(tmp_path, node_version):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # An npm that says what it was asked, standing in for the registry's download.
    (bin_dir / "npm").write_text(
        f'#!/bin/sh\necho "npm $*"\n{shutil.which("mkdir")} node_modules\n'
    )
    (bin_dir / "npm").chmod(0o755)
    done = npm_set_up(tmp_path, node_version=node_version, npm=False)

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        "[flex] installing the pinned solc and anvil from npm",
        "npm ci --no-audit --no-fund --loglevel=error",
    ]
    assert (tmp_path / "node_modules" / ".installed").exists()
