"""Speed-up of our code over its anchor, per benchmark case, from pytest-benchmark records.

Every benchmark sets extra_info role ("ours" | "anchor"), case, flops and bytes (each
bench_*.py says how it counts them). Ratios compare two timings taken in the same run, so they survive
a noisy shared machine far better than absolute times. Each side's time is its best round:
other jobs only ever add time, so the minimum is the least disturbed estimate of both.
"""
from __future__ import annotations


def case_table(records: list[dict]) -> dict[str, dict]:
    """{case: {ours_s, anchor_s, speedup, gflops, gbps}} from benchmark dicts (as in the JSON)."""
    cases: dict[str, dict] = {}
    for rec in records:
        info = rec.get("extra_info", {})
        role, case = info.get("role"), info.get("case")
        if role not in ("ours", "anchor") or not case:
            continue
        row = cases.setdefault(case, {})
        row[f"{role}_s"] = rec["stats"]["min"]
        if role == "ours":
            row["flops"], row["bytes"] = info.get("flops", 0.0), info.get("bytes", 0.0)
            row.update({k: v for k, v in info.items() if k.startswith("peak_")})
    # An "ours" record may name the case of its anchor (one anchor timed for several
    # variants of ours, as in bench_sweep.py).
    for rec in records:
        info = rec.get("extra_info", {})
        anchor = cases.get(info.get("anchor_case", ""), {})
        if info.get("role") == "ours" and info.get("case") in cases and "anchor_s" in anchor:
            cases[info["case"]].setdefault("anchor_s", anchor["anchor_s"])
    for row in cases.values():
        if "ours_s" in row and "anchor_s" in row:
            row["speedup"] = row["anchor_s"] / row["ours_s"]
        if "ours_s" in row:
            row["gflops"] = row.get("flops", 0.0) / row["ours_s"] / 1e9
            row["gbps"] = row.get("bytes", 0.0) / row["ours_s"] / 1e9
    return cases


def format_table(cases: dict[str, dict], peak_gflops: float | None = None,
                 peak_gbps: float | None = None) -> str:
    """A markdown table: case, times, speed-up, achieved rates (and % of the machine's)."""
    def pct(value, peak):
        return f" ({100 * value / peak:.0f}%)" if peak and value else ""

    lines = ["| case | ours ms | anchor ms | speed-up | GFLOP/s | GB/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for case in sorted(cases):
        row = cases[case]
        ours = f"{1e3 * row['ours_s']:.2f}" if "ours_s" in row else "-"
        anchor = f"{1e3 * row['anchor_s']:.2f}" if "anchor_s" in row else "-"
        speed = f"{row['speedup']:.2f}x" if "speedup" in row else "-"
        gf = f"{row['gflops']:.1f}{pct(row['gflops'], peak_gflops)}" if row.get("gflops") else "-"
        gb = f"{row['gbps']:.1f}{pct(row['gbps'], peak_gbps)}" if row.get("gbps") else "-"
        lines.append(f"| {case} | {ours} | {anchor} | {speed} | {gf} | {gb} |")
    return "\n".join(lines)
