"""`make bench`: run every benchmark, each in its own process, and print where results went.

Each part writes var/bench/<part>.json and prints its own table (options after a single
part's name go to it: `python -m bench scale --quick`). The summary tells a part that ran
but missed a target from one that failed; after every part has run, the whole run exits 1
if any failed, else TARGET_MISSED (2) if any missed a target, else 0.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from bench import TARGET_MISSED

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("gas", "verify", "aggregation", "sync", "web", "e2e", "scale", "load")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"any of {', '.join(PARTS)}")
    args, options = parser.parse_known_args(argv)
    if options and len(args.parts) != 1:
        parser.error(f"options {' '.join(options)} go to one part: name exactly one")
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s): {', '.join(unknown)}")
    parts = [p for p in (args.parts or PARTS) if (ROOT / "bench" / f"{p}.py").exists()]
    results = []
    for part in parts:
        print(f"\n=== bench: {part} ===", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, "-m", f"bench.{part}", *options], cwd=ROOT)
        results.append((part, code, time.monotonic() - started))
    print("\n=== bench summary ===")
    print(f"{'part':<12} {'result':<11} {'seconds':>8}  file")
    for part, code, seconds in results:
        status = {0: "ok", TARGET_MISSED: "missed"}.get(code, f"FAILED ({code})")
        print(f"{part:<12} {status:<11} {seconds:8.1f}  var/bench/{part}.json")
    codes = {code for _, code, _ in results}
    if codes <= {0}:
        return 0
    return TARGET_MISSED if codes == {0, TARGET_MISSED} or codes == {TARGET_MISSED} else 1


if __name__ == "__main__":
    sys.exit(main())
