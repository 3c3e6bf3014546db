"""Regression gate: fails when an op got more than 25% slower *relative to its anchor*.

    pytest benchmarks --benchmark-enable --benchmark-json=/tmp/bench.json
    python benchmarks/gate.py benchmarks/baseline_cpu.json /tmp/bench.json

Absolute times on shared machines swing by more than 25% from run to run; the ratio
ours/anchor, both timed in the same run, is what the gate compares.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ratios import case_table  # noqa: E402


def compare(baseline: dict, current: dict, tolerance: float) -> list[str]:
    """Lines describing each case that regressed (empty when all are fine)."""
    failures = []
    for case, base in sorted(baseline.items()):
        if "speedup" not in base:
            continue
        now = current.get(case)
        if now is None or "speedup" not in now:
            print(f"  {case}: not in the current run (skipped)")
            continue
        change = base["speedup"] / now["speedup"]  # > 1: we lost ground against the anchor
        verdict = "REGRESSED" if change > 1 + tolerance else "ok"
        print(f"  {case}: speed-up {base['speedup']:.2f}x -> {now['speedup']:.2f}x  {verdict}")
        if verdict != "ok":
            failures.append(f"{case}: {100 * (change - 1):.0f}% slower relative to its anchor")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="saved pytest-benchmark JSON")
    parser.add_argument("current", type=Path, help="pytest-benchmark JSON of this run")
    parser.add_argument("--tolerance", type=float, default=0.25,
                        help="allowed relative slow-down against the anchor (default 0.25)")
    args = parser.parse_args(argv)
    tables = []
    for path in (args.baseline, args.current):
        try:
            tables.append(case_table(json.loads(path.read_text())["benchmarks"]))
        except (OSError, ValueError, KeyError) as exc:
            print(f"gate: error: {path}: not a pytest-benchmark JSON file ({exc})", file=sys.stderr)
            return 2
    failures = compare(*tables, tolerance=args.tolerance)
    for line in failures:
        print(f"gate: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
