"""Regression gate: fails when an op got more than 25% slower *relative to its anchor*.

    pytest benchmarks --benchmark-enable --benchmark-json=/tmp/bench.json
    python benchmarks/gate.py benchmarks/baseline_cpu.json /tmp/bench.json

Absolute times on shared machines swing by more than 25% from run to run; the ratio
ours/anchor, both timed in the same run, is what the gate compares.

Ratios depend on the instruction set (torch's anchors run about twice as fast with
AVX-512, our kernels have a variant per instruction set), so baseline_cpu.json holds one
pytest-benchmark JSON per CPU capability ({"avx2": {...}, "avx512": {...}}) and the gate
compares a run with the baseline of its own capability: the run's
"stnpadim_cpu_capability" (benchmarks/conftest.py records it), else the one its CPU flags
imply, else --capability. With no baseline for that capability it says so and passes. A
plain pytest-benchmark JSON still works as a baseline for any capability.
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


CAPABILITIES = ("default", "avx2", "avx512")


def run_capability(run: dict) -> str | None:
    """The CPU kernel variant a pytest-benchmark run used: recorded, else from its CPU flags."""
    if run.get("stnpadim_cpu_capability") in CAPABILITIES:
        return run["stnpadim_cpu_capability"]
    flags = set(run.get("machine_info", {}).get("cpu", {}).get("flags", []))
    if not flags:
        return None
    if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "default"


def pick_baseline(baselines: dict, capability: str | None) -> tuple[dict | None, str]:
    """The baseline run for a capability, and a line saying which one was taken."""
    if "benchmarks" in baselines:  # a single pytest-benchmark JSON: one baseline for all
        return baselines, "a single baseline (not keyed by CPU capability)"
    if capability in baselines:
        return baselines[capability], f"the {capability} baseline"
    return None, (f"no baseline for CPU capability {capability or 'unknown'} "
                  f"(baselines: {', '.join(sorted(baselines)) or 'none'}); nothing to compare")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="saved pytest-benchmark JSON")
    parser.add_argument("current", type=Path, help="pytest-benchmark JSON of this run")
    parser.add_argument("--tolerance", type=float, default=0.25,
                        help="allowed relative slow-down against the anchor (default 0.25)")
    parser.add_argument("--capability", choices=CAPABILITIES,
                        help="compare with this capability's baseline (default: the run's own)")
    args = parser.parse_args(argv)
    try:
        baselines = json.loads(args.baseline.read_text())
        current = json.loads(args.current.read_text())
        if not isinstance(baselines, dict) or not isinstance(current, dict):
            raise ValueError("not a JSON object")
        capability = args.capability or run_capability(current)
        baseline, which = pick_baseline(baselines, capability)
        print(f"gate: current run on CPU capability {capability or 'unknown'}; comparing with {which}")
        if baseline is None:
            return 0
        tables = [case_table(baseline["benchmarks"]), case_table(current["benchmarks"])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"gate: error: {args.baseline} or {args.current}: not a pytest-benchmark JSON file ({exc})",
              file=sys.stderr)
        return 2
    failures = compare(*tables, tolerance=args.tolerance)
    for line in failures:
        print(f"gate: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
