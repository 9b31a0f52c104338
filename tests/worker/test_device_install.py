"""A device host installs only what a node needs: requirements-device.txt is the closure of
requirements-device.in at the full freeze's versions, holds no web or test tools, and covers
every module the node's code paths load, none of them Django."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
# Installed by venv itself, and left out of pip's freeze in requirements.txt too.
BOOTSTRAP = {"pip", "setuptools", "wheel"}
NOT_ON_DEVICES = {"django", "uvicorn", "channels", "djangorestframework", "playwright", "pytest"}
# What `python -m worker join/start/balance/withdraw` and the work it does load.
NODE_MODULES = [
    "worker.__main__",
    "worker.join",
    "worker.node",
    "worker.app",
    "worker.tasks",
    "worker.trainer",
    "worker.aggregator",
    "worker.status",
    "worker.payments",
    "worker.retention",
    "chain.withdrawals",
    "training.local",
    "training.evaluate",
]


def _names(path: Path) -> list[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]


def _pins(path: Path) -> dict[str, str]:
    return {
        canonicalize_name(name): version
        for name, _, version in (line.partition("==") for line in _names(path))
    }


def _closure(direct: list[str]) -> set[str]:
    """Every distribution ``direct`` needs, by the installed packages' own metadata."""
    extras: dict[str, set[str]] = {}
    todo = [Requirement(d) for d in direct]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in extras and set(req.extras) <= extras[name]:
            continue
        extras[name] = extras.get(name, set()) | set(req.extras)
        for text in metadata.distribution(req.name).requires or []:
            dep = Requirement(text)
            wanted = extras[name] or {""}
            if dep.marker and not any(dep.marker.evaluate({"extra": e}) for e in wanted):
                continue
            todo.append(dep)
    return set(extras) - BOOTSTRAP


def test_the_device_set_is_the_closure_of_its_direct_needs_at_the_freezes_versions():
    device = _pins(ROOT / "requirements-device.txt")
    full = _pins(ROOT / "requirements.txt")

    assert set(device) == _closure(_names(ROOT / "requirements-device.in"))
    assert {name: full.get(name) for name in device} == device
    assert not set(device) & NOT_ON_DEVICES


def test_the_node_code_paths_run_without_django_or_anything_outside_the_device_set():
    # This checkout has every package installed; a device host has only the device set. The
    # child process is made to see what a device host sees: importing anything else fails,
    # as it would there (optional imports, such as kombu's of Django, then fall back).
    providers = metadata.packages_distributions()
    device = set(_pins(ROOT / "requirements-device.txt")) | BOOTSTRAP
    absent = sorted(
        module
        for module, dists in providers.items()
        if not {canonicalize_name(d) for d in dists} & device
    )
    assert "django" in absent  # the check below means something
    code = (
        "import importlib, importlib.abc, json, sys\n"
        "absent = set(json.loads(sys.argv[1]))\n"
        "class NotOnDevices(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in absent:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NotOnDevices())\n"
        f"for name in {NODE_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "from worker.__main__ import parser\n"
        "parser().parse_args(['start', '--home', '/nonexistent'])\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(absent)],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert "django" not in loaded
    assert not loaded & set(absent)
