"""The package map: every import between FLEX's packages runs the way README.md's Layout
table allows, read from the source with ast (run-time, type-only and function-level imports
alike), so no package imports one that imports it back."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `(?P<package>\w+)/` \|.*\| (?P<allowed>[^|]+) \|$")
# The web app takes only the client side of the data plane: it fetches (over pinned TLS) and
# checks what devices advertise (and, for a buyer, a model against its updates), it never
# serves.
MARKETPLACE_DATAPLANE = {
    "dataplane.addresses",
    "dataplane.audit",
    "dataplane.client",
    "dataplane.protocol",
    "dataplane.signing",
    "dataplane.tls",
}


def layout() -> dict[str, set[str] | None]:
    """package -> the packages it may import (None: any), from README.md's Layout table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    found: dict[str, set[str] | None] = {}
    for line in section.splitlines():
        if match := ROW.match(line.strip()):
            allowed = match["allowed"].strip()
            found[match["package"]] = (
                None if allowed == "any" else set(re.findall(r"`(\w+)`", allowed))
            )
    return found


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def wrong_way() -> list[str]:
    packages = layout()
    bad = []
    for package, allowed in packages.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module in imports_of(path):
                top = module.split(".")[0]
                if top == package or top not in packages:
                    continue
                where = f"{path.relative_to(ROOT)}:{line} imports {module}"
                if allowed is not None and top not in allowed:
                    bad.append(where)
                elif (
                    package == "marketplace"
                    and top == "dataplane"
                    and not any(module.startswith(m) for m in MARKETPLACE_DATAPLANE)
                ):
                    bad.append(where + " (the web app uses the data plane's client only)")
    return sorted(set(bad))


def test_the_readme_maps_every_package():
    packages = layout()
    assert {"core", "chain", "training", "dataplane", "worker", "marketplace"} <= set(packages)
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert on_disk == set(packages), "every package needs a row in README.md's Layout"


def test_every_import_runs_the_way_the_map_allows():
    assert wrong_way() == []


def test_the_map_has_no_cycle():
    packages = layout()

    def visit(package: str, path: tuple[str, ...]) -> None:
        if package in path:
            pytest.fail("cycle in README.md's Layout: " + " -> ".join((*path, package)))
        for dependency in packages.get(package) or ():
            visit(dependency, (*path, package))

    for package in packages:
        visit(package, ())


def test_a_wrong_arrow_is_caught(tmp_path, monkeypatch):
    # The check itself: a training module importing chain is reported with its line.
    (tmp_path / "training").mkdir()
    source = "import os\n\n\ndef f():\n    from chain import client\n"
    (tmp_path / "training" / "x.py").write_text(source)
    (tmp_path / "chain").mkdir()
    (tmp_path / "README.md").write_text(
        "## Layout\n\n| `training/` | t | `core` |\n| `chain/` | c | `core` |\n"
    )
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert wrong_way() == ["training/x.py:5 imports chain", "training/x.py:5 imports chain.client"]
