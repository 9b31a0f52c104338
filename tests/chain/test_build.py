"""The committed contract artefacts are exactly what the pinned solc makes of the sources."""

import json

import pytest

from chain import build


def test_committed_artefacts_are_fresh():
    build.check_fresh()


def test_stale_artefacts_are_detected(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "BUILD", tmp_path)
    (tmp_path / "build-info.json").write_text(json.dumps({"solc": "0.0.0"}))
    with pytest.raises(build.StaleArtefactsError) as exc:
        build.check_fresh()
    assert "build-info.json" in exc.value.files
    assert "FlexMarket.json" in exc.value.files


def test_warnings_fail_the_build():
    source = "// SPDX-License-Identifier: MIT\npragma solidity 0.8.30;\n"
    source += "contract W { function f() external view returns (uint256) { return 1; } }\n"
    with pytest.raises(build.CompileError) as exc:
        build.compile_sources({"W.sol": source})
    assert exc.value.count == 1
    assert "can be restricted to pure" in exc.value.message


def test_artefact_has_abi_and_bytecode():
    art = build.load_artifact("FlexMarket")
    assert art["bytecode"].startswith("0x60")
    assert any(item.get("name") == "createTask" for item in art["abi"])
