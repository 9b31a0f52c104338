"""Chain sync is the only writer of mirror rows: no other marketplace module writes one
through its manager (what the website and the nodes record has rows of its own)."""

from __future__ import annotations

import ast
from pathlib import Path

MARKETPLACE = Path(__file__).resolve().parents[2] / "marketplace"
MIRROR_MODELS = {"Task", "Bid", "SelectedNode", "Round", "Update", "Payout", "ChainEventRecord"}
WRITES = {
    "create",
    "bulk_create",
    "bulk_update",
    "update",
    "update_or_create",
    "get_or_create",
    "delete",
}


def _mirror_writes(source: str, name: str) -> list[str]:
    """``Model.objects.<write>(...)`` calls on a mirror model, anywhere in a chain of calls."""
    found = []
    for node in ast.walk(ast.parse(source, filename=name)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in WRITES:
            continue
        base = node.func.value
        while isinstance(base, ast.Call | ast.Attribute):
            if (
                isinstance(base, ast.Attribute)
                and base.attr == "objects"
                and isinstance(base.value, ast.Name)
                and base.value.id in MIRROR_MODELS
            ):
                found.append(f"{name}:{node.lineno}")
                break
            base = base.func if isinstance(base, ast.Call) else base.value
    return found


def test_only_chain_sync_writes_mirror_rows():
    modules = [
        p
        for p in MARKETPLACE.rglob("*.py")
        if "migrations" not in p.parts and (MARKETPLACE / "sync") not in p.parents
    ]
    assert modules
    writes = [w for p in modules for w in _mirror_writes(p.read_text(), str(p))]
    assert writes == []


def test_the_check_sees_a_services_write():
    source = (
        "Task.objects.filter(pk=1).update(state='x')\n"
        "Task.objects.get_or_create(chain_task_id=1)\n"
        "TaskOrder.objects.create(title='mine')\n"
    )
    assert _mirror_writes(source, "services.py") == ["services.py:1", "services.py:2"]
