"""make stress: run the tests marked `realtime` (real processes, signals, threads, the clock)
several times in a row and print how often each passed. Not part of make test.

    python tests/stress.py --runs 5 [pytest args...]

Each run is a fresh pytest with a JUnit XML report; a test passes a run when it neither
failed nor errored nor was skipped. Exits 1 unless every test passed every run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path


def outcomes(report: Path) -> dict[str, str]:
    """test id -> passed, failed, error or skipped, from one JUnit XML report."""
    found = {}
    for case in ET.parse(report).iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name')}"
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        found[test] = {"failure": "failed"}.get(kinds[0], kinds[0]) if kinds else "passed"
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args, pytest_args = parser.parse_known_args(argv)
    passed: Counter[str] = Counter()
    seen: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="fineinfer-stress-") as tmp:
        for run in range(1, args.runs + 1):
            report, start = Path(tmp) / f"run-{run}.xml", time.monotonic()
            command = [sys.executable, "-m", "pytest", "-q", "-m", "realtime", "-p",
                       "no:cacheprovider", f"--junitxml={report}", *pytest_args]  # fmt: skip
            subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if not report.exists():
                print(f"run {run}: pytest wrote no report", flush=True)
                continue
            found = outcomes(report)
            for test, outcome in found.items():
                seen.setdefault(test, []).append(outcome)
                passed[test] += outcome == "passed"
            bad = {t: o for t, o in found.items() if o != "passed"}
            print(f"run {run}/{args.runs}: {len(found) - len(bad)}/{len(found)} passed in "
                  f"{time.monotonic() - start:.0f} s {bad or ''}", flush=True)  # fmt: skip
    print(f"\npasses per test ({args.runs} runs):")
    for test in sorted(seen):
        other = Counter(o for o in seen[test] if o != "passed")
        note = "  " + ", ".join(f"{n} {o}" for o, n in other.items()) if other else ""
        print(f"  {passed[test]}/{args.runs}  {test}{note}")
    everything = bool(seen) and all(passed[t] == args.runs for t in seen)
    return 0 if everything else 1


if __name__ == "__main__":
    sys.exit(main())
