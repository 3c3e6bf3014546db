"""Benchmark session: measures the machine's matmul and copy rates, prints the ratio table.

Run: `pytest benchmarks --benchmark-enable` (add --benchmark-json=FILE for the gate).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from bench_padim import BATCH, SIZE, anomalib_fit, batches, build_anomalib, resnet18_weights
from bench_sweep import sweep_report
from ratios import case_table, format_table

import stnpadim_ext as sp
from stnpadim_ext.models.padim import PaDiM

_rates: dict[str, dict] = {}


def _best_of(fn, repeats=5):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def machine_rates(device: str = "cpu") -> dict:
    """Measured fp32 matmul GFLOP/s and copy GB/s: the ceilings we report against."""
    if device not in _rates:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        n = 8192 if device == "cuda" else 2048
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        src = torch.empty(512 * 2**20 // 4 if device == "cuda" else 64 * 2**20 // 4, device=device)
        dst = torch.empty_like(src)

        def mm():
            torch.mm(a, b)
            sync()

        def copy():
            dst.copy_(src)
            sync()

        _rates[device] = {"matmul_gflops": 2 * n**3 / _best_of(mm) / 1e9,
                          "copy_gbps": 2 * src.numel() * 4 / _best_of(copy) / 1e9}
    return _rates[device]


def _devices(records) -> list[str]:
    cuda = any("cuda" in str(r["extra_info"].get("case", "")) for r in records)
    return ["cpu"] + (["cuda"] if cuda and torch.cuda.is_available() else [])


def cpu_capability() -> str:
    """The CPU kernel variant the run used by default (sweeps also force the others)."""
    return sp.backend_info()["cpu_capability"]


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["stnpadim_cases"] = case_table(output_json["benchmarks"])
    output_json["stnpadim_rates"] = {d: machine_rates(d) for d in _devices(output_json["benchmarks"])}
    output_json["stnpadim_threads"] = torch.get_num_threads()
    # benchmarks/gate.py compares a run with the baseline of the same capability.
    output_json["stnpadim_cpu_capability"] = cpu_capability()


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    records = [b.as_dict(include_data=False) for b in session.benchmarks]
    terminalreporter.section("stnpadim: speed-up over the anchor, same run")
    for device in _devices(records):
        r = machine_rates(device)
        cases = {k: v for k, v in case_table(records).items()
                 if ("cuda" in k) == (device == "cuda") and "-sweep:" not in k}
        terminalreporter.write_line(
            f"{device}: measured ceilings {r['matmul_gflops']:.0f} GFLOP/s fp32 matmul, "
            f"{r['copy_gbps']:.0f} GB/s copy; {torch.get_num_threads()} threads; "
            f"CPU kernels: {cpu_capability()}")
        if cases:
            terminalreporter.write_line(format_table(cases, r["matmul_gflops"], r["copy_gbps"]))
    for line in sweep_report(records):
        terminalreporter.write_line(line)
    for record in records:  # cases that summarise themselves (bench_padim's from-files bound)
        if "summary" in record["extra_info"]:
            terminalreporter.write_line(f"{record['extra_info']['case']}: {record['extra_info']['summary']}")


# ---------------------------------------------------------------------------- PaDiM fixtures
# Shared by bench_padim.py and bench_export.py (module scope: each suite fits its own): the
# same resnet18 weights, fitted model, anomalib twin and test batch on both.


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return resnet18_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def ours(weights):
    model = PaDiM("resnet18", weights=weights, image_size=SIZE, progress=False, device="cpu")
    return model.fit(batches(64, seed=1))


@pytest.fixture(scope="module")
def anomalib_model(weights, ours):
    pytest.importorskip("anomalib", reason="anomalib is not installed: pip install anomalib")
    model = build_anomalib(weights, ours.embedding.idx.clone())
    anomalib_fit(model, batches(64, seed=1))
    return model


@pytest.fixture(scope="module")
def test_batch() -> torch.Tensor:
    return next(batches(BATCH, seed=2))
