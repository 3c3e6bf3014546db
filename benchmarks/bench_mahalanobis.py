"""Mahalanobis op vs the anomalib formulation; streaming fit vs stacking all embeddings.

Run: `pytest benchmarks/bench_mahalanobis.py --benchmark-enable`.

Anchor of the op: anomalib's PaDiM `compute_distance`, `(delta @ inv_cov * delta).sum(2)`
with the full float32 inverse covariance [P, C, C], on the same threads. anomalib leaves
`delta` a permuted view; we make it contiguous first because on this torch bmm on the view
is up to 30x slower (C=550, B=8: ~10-35 s instead of ~1 s), so the anchor is the faster one.

Anchor of the fit: keep every embedding, stack them, then per patch covariance + 0.01 I
(anomalib/PaDiM reference) and torch.linalg.inv. Both sides get the same batches, made
on the fly as a backbone would. Peak memory is the growth of the peak resident set while
fitting, measured in a fresh process (VmHWM reset through /proc/self/clear_refs).

The C=550 cases hold a 1.9 GB packed factor and the anchor's 3.8 GB inverse covariance.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stnpadim_ext as sp
from stnpadim_ext import _backend

PATCHES = 3136                                  # 56 x 56
# (C, B, rounds): a few rounds for the long cases.
CASES = [(100, 1, 10), (100, 32, 5), (550, 1, 3), (550, 8, 3), (550, 32, 2)]
CUDA_CASES = [(100, 32, 20), (550, 32, 10)]
FIT_IMAGES, FIT_BATCH, FIT_DIM = 256, 32, 100
HAS_CUDA = torch.cuda.is_available() and _backend.has_kernel("mahalanobis", "cuda")


@functools.lru_cache(maxsize=1)
def model(dim: int, device: str = "cpu"):
    """(PatchGaussian, anchor mean [C, P], anchor inverse covariances [P, C, C]) for 3136 patches.

    Sixteen real fitted Gaussians tiled over the patches: every patch still has its own
    copy in memory (the traffic is real), and the anchor's inverse covariance is built
    from the same factors, so both sides compute the same distances.
    """
    gen = torch.Generator().manual_seed(dim)
    base = sp.GaussianStats(16, dim).update(torch.randn(dim + 64, dim, 16, generator=gen)).finalize()
    reps = PATCHES // 16
    gaussian = sp.PatchGaussian(base.mean.repeat(reps, 1), base.factor_packed.repeat(reps, 1))
    factor = base.factor()
    inv_cov = (factor.transpose(1, 2) @ factor).repeat(reps, 1, 1)
    return gaussian.to(device), gaussian.mean.T.contiguous().to(device), inv_cov.to(device)


def anomalib_distance(emb: torch.Tensor, mean: torch.Tensor, inv_cov: torch.Tensor) -> torch.Tensor:
    """anomalib PadimModel's compute_distance, with delta made contiguous (see the docstring)."""
    delta = (emb - mean).permute(2, 0, 1).contiguous()                     # [P, B, C]
    distances = (torch.matmul(delta, inv_cov) * delta).sum(2).permute(1, 0)
    return distances.clamp(0).sqrt()


def _op_info(dim: int, batch: int, factor_bytes: int = 4) -> dict:
    packed = dim * (dim + 1) // 2
    return {"flops": 2.0 * PATCHES * batch * packed,       # one multiply-add per factor element
            "bytes": PATCHES * (factor_bytes * packed + 4.0 * (dim + batch * dim + batch))}


# Ours with the float32 factor and with it stored in bfloat16 (PaDiM factor_dtype), which
# is timed against the same anchor: the anchor case's name is the float32 one.
ROLES = [("ours", "float32"), ("ours", "bfloat16"), ("anchor", "float32")]


def _run_case(benchmark, device, dim, batch, rounds, role, factor_dtype="float32"):
    gaussian, mean, inv_cov = model(dim, device)
    gaussian = gaussian.with_factor_dtype(getattr(torch, factor_dtype))
    emb = torch.randn(batch, dim, PATCHES, generator=torch.Generator().manual_seed(batch)).to(device)
    emb += gaussian.mean.T
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fns = {"ours": lambda: sp.mahalanobis(emb, gaussian), "anchor": lambda: anomalib_distance(emb, mean, inv_cov)}
    if role == "ours":  # both compute the same distances (bfloat16 within its rounding)
        torch.testing.assert_close(fns["ours"](), fns["anchor"](), rtol=2e-3, atol=2e-3)

    def call():
        out = fns[role]()
        sync()
        return out

    anchor_case = f"mahalanobis:P{PATCHES}-C{dim}-B{batch}" + ("-cuda" if device == "cuda" else "")
    case = anchor_case + ("-bf16factor" if factor_dtype == "bfloat16" else "")
    benchmark.group = anchor_case
    info = _op_info(dim, batch, gaussian.factor_packed.element_size())
    if role == "anchor":  # the full matrix: C^2 multiply-adds and 4 C^2 bytes per patch
        info = {"flops": 2.0 * PATCHES * batch * dim * dim, "bytes": 4.0 * PATCHES * dim * dim}
    benchmark.extra_info.update(role=role, case=case, anchor_case=anchor_case, **info)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)


@pytest.mark.parametrize("role,factor_dtype", ROLES, ids=[f"{r}-{f}" for r, f in ROLES])
@pytest.mark.parametrize("dim,batch,rounds", CASES, ids=[f"C{c}-B{b}" for c, b, _ in CASES])
def test_mahalanobis_cpu(benchmark, dim, batch, rounds, role, factor_dtype):
    _run_case(benchmark, "cpu", dim, batch, rounds, role, factor_dtype)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("role,factor_dtype", ROLES, ids=[f"{r}-{f}" for r, f in ROLES])
@pytest.mark.parametrize("dim,batch,rounds", CUDA_CASES, ids=[f"C{c}-B{b}" for c, b, _ in CUDA_CASES])
def test_mahalanobis_cuda(benchmark, dim, batch, rounds, role, factor_dtype):
    _run_case(benchmark, "cuda", dim, batch, rounds, role, factor_dtype)


# ---- fit of 256 images -------------------------------------------------------------------

def _batches():
    """The training embeddings, one fresh [32, 100, 3136] tensor at a time."""
    pool = torch.randn(FIT_BATCH, FIT_DIM, PATCHES, generator=torch.Generator().manual_seed(0))
    for i in range(FIT_IMAGES // FIT_BATCH):
        yield pool + float(i)


def fit_streaming():
    stats = sp.GaussianStats(PATCHES, FIT_DIM)
    for emb in _batches():
        stats.update(emb)
    return stats.finalize(eps=0.01)


def fit_stacked():
    emb = torch.cat(list(_batches()))                                     # [N, C, P]
    mean = emb.mean(0)
    cov = torch.empty(FIT_DIM, FIT_DIM, PATCHES)
    eye = torch.eye(FIT_DIM)
    for p in range(PATCHES):
        cov[:, :, p] = torch.cov(emb[:, :, p].T) + 0.01 * eye
    return mean, torch.linalg.inv(cov.permute(2, 0, 1))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_peak(role: str) -> int:
    """Bytes by which the peak resident set grows while fitting (run in a fresh process)."""
    fn = {"ours": fit_streaming, "anchor": fit_stacked}[role]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                     # resets VmHWM to the current RSS
    base = _status_kb("VmRSS")
    fn()
    return 1024 * (_status_kb("VmHWM") - base)


@pytest.mark.parametrize("role", ["ours", "anchor"])
def test_fit_256_images(benchmark, role):
    case = f"fit:N{FIT_IMAGES}-C{FIT_DIM}-P{PATCHES}"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, __file__, "--peak", role], capture_output=True,
                           text=True, check=True, env=env)
    peak = json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_growth_bytes"]
    benchmark.group = case
    benchmark.extra_info.update(role=role, case=case, flops=0.0, bytes=0.0,
                                peak_rss_growth_bytes=peak)
    benchmark.pedantic({"ours": fit_streaming, "anchor": fit_stacked}[role], rounds=2, warmup_rounds=0)


if __name__ == "__main__" and sys.argv[1:2] == ["--peak"]:
    print(json.dumps({"peak_rss_growth_bytes": measure_peak(sys.argv[2])}))
