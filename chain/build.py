"""Compile contracts/*.sol with the pinned npm solc into committed artefacts, and check them."""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from core.errors import FlexError

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = ROOT / "contracts"
BUILD = CONTRACTS / "build"
SOLCJS = ROOT / "node_modules" / ".bin" / "solcjs"
SETTINGS: dict[str, Any] = {
    "optimizer": {"enabled": True, "runs": 200},
    "evmVersion": "cancun",
    "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
}


_COMPILE_JS = """
const fs = require("fs");
let solc;
try {
  solc = require("solc");
} catch (e) {
  console.error("the npm package solc is missing: run npm ci");
  process.exit(2);
}
fs.writeFileSync(process.argv[1], solc.compile(fs.readFileSync(0, "utf8")));
"""


class CompileError(FlexError):
    """The Solidity sources did not compile cleanly (errors or warnings)."""

    code = "compile_failed"


class StaleArtefactsError(FlexError):
    """contracts/build/ does not match what the sources compile to."""

    code = "stale_artefacts"


def sources() -> dict[str, str]:
    """Every .sol file under contracts/, keyed by its path relative to contracts/."""
    return {
        str(p.relative_to(CONTRACTS)): p.read_text()
        for p in sorted(CONTRACTS.rglob("*.sol"))
        if BUILD not in p.parents
    }


def compile_sources(srcs: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Artefacts ``{name: {abi, bytecode, deployedBytecode, source}}``; warnings count as errors."""
    request = {
        "language": "Solidity",
        "sources": {path: {"content": text} for path, text in srcs.items()},
        "settings": SETTINGS,
    }
    # solc's own CLI can exit before a large JSON answer is flushed to a pipe, so the
    # compiler's answer goes through a file.
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "solc-output.json"
        try:
            subprocess.run(
                ["node", "-e", _COMPILE_JS, str(out)],
                input=json.dumps(request),
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
        except FileNotFoundError as exc:
            raise CompileError("node is not installed: FLEX needs Node.js 18+") from exc
        except subprocess.CalledProcessError as exc:
            raise CompileError(f"solc failed: {exc.stderr.strip()}") from exc
        output = json.loads(out.read_text())
    problems = [e for e in output.get("errors", []) if e["severity"] in ("error", "warning")]
    if problems:
        text = "\n".join(e.get("formattedMessage", e["message"]) for e in problems)
        raise CompileError(
            f"solc reported {len(problems)} problem(s):\n{text}", count=len(problems)
        )
    artefacts = {}
    for path, contracts in output["contracts"].items():
        for name, out in contracts.items():
            artefacts[name] = {
                "contractName": name,
                "source": path,
                "abi": out["abi"],
                "bytecode": "0x" + out["evm"]["bytecode"]["object"],
                "deployedBytecode": "0x" + out["evm"]["deployedBytecode"]["object"],
            }
    return artefacts


def solc_version() -> str:
    proc = subprocess.run([str(SOLCJS), "--version"], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def build_info(srcs: dict[str, str]) -> dict[str, Any]:
    return {
        "solc": solc_version(),
        "settings": SETTINGS,
        "sources": {p: hashlib.sha256(t.encode()).hexdigest() for p, t in srcs.items()},
    }


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def compile_contracts() -> dict[str, dict[str, Any]]:
    """Compile every source and (re)write contracts/build/; returns the artefacts."""
    srcs = sources()
    artefacts = compile_sources(srcs)
    BUILD.mkdir(parents=True, exist_ok=True)
    for old in BUILD.glob("*.json"):
        old.unlink()
    for name, art in artefacts.items():
        (BUILD / f"{name}.json").write_text(_dump(art))
    (BUILD / "build-info.json").write_text(_dump(build_info(srcs)))
    return artefacts


def check_fresh() -> None:
    """Raise StaleArtefactsError unless contracts/build/ is exactly what the sources give."""
    srcs = sources()
    stale = []
    info_path = BUILD / "build-info.json"
    if not info_path.exists() or json.loads(info_path.read_text()) != build_info(srcs):
        stale.append("build-info.json")
    for name, art in compile_sources(srcs).items():
        path = BUILD / f"{name}.json"
        if not path.exists() or path.read_text() != _dump(art):
            stale.append(f"{name}.json")
    if stale:
        raise StaleArtefactsError(
            f"contracts/build is stale ({', '.join(stale)}): run `python -m chain.build`",
            files=stale,
        )


def compiler_metadata(code: bytes | str) -> bytes:
    """The metadata solc appends to a contract's runtime code (CBOR, its length in the last two
    bytes): the hash of the compiler's version and settings and of every source, so two codes
    built from different sources end differently, whatever immutables the deployment set.
    Empty for code without it."""
    raw = bytes.fromhex(code.removeprefix("0x")) if isinstance(code, str) else bytes(code)
    length = int.from_bytes(raw[-2:], "big") + 2 if len(raw) >= 2 else 0
    return raw[-length:] if 2 < length <= len(raw) else b""


def load_artifact(name: str = "FlexMarket") -> dict[str, Any]:
    """The committed artefact of a contract: abi, bytecode, deployedBytecode."""
    path = BUILD / f"{name}.json"
    if not path.exists():
        raise CompileError(f"{path} is missing: run `python -m chain.build`", name=name)
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chain.build", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when artefacts are stale")
    args = parser.parse_args(argv)
    try:
        if args.check:
            check_fresh()
            print("contracts/build is up to date")
        else:
            names = compile_contracts()
            print(f"compiled {', '.join(sorted(names))} into {BUILD.relative_to(ROOT)}/")
    except FlexError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
