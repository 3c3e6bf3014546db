"""No cliffs: the ops over batch and channel counts, per CPU kernel variant, beside their anchors.

    pytest benchmarks/bench_sweep.py --benchmark-enable -s      # ~20 min on 2 cores

mahalanobis: B = 1 .. 128 at C = 100 and C = 550 (P = 3136), against anomalib's matmul
formulation (bench_mahalanobis.anomalib_distance). affine_sample: batch 1 .. 64 at
3x224x224 and channels 1 .. 128 at B = 8, 56x56, forward and forward + backward, against
torch's affine_grid + grid_sample. Every shape runs once per variant this CPU can run
(STNPADIM_CPU_CAPABILITY), each anchor once per shape, all in one process: the ratios
compare timings of the same run. The terminal summary prints the sweep per variant and
flags a cliff (the speed-up falling by more than a third from the previous size) and any
shape slower than its anchor.

Under the default --benchmark-disable (the test suite's smoke run) every case runs once
on a small problem (P = 16, small images) and checks ours against the anchor.
"""
from __future__ import annotations

import functools

import pytest
import torch
from bench_mahalanobis import anomalib_distance, model

import stnpadim_ext as sp
from stnpadim_ext import _backend
from stnpadim_ext.ops.affine_sample import affine_sample, affine_sample_reference

VARIANTS = _backend.cpu_capabilities()
HAS_CPU = _backend.has_kernel("mahalanobis", "cpu") and _backend.has_kernel("affine_sample", "cpu")
BATCHES = [1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 24, 32, 33, 48, 64, 65, 96, 128]
DIMS = [100, 550]
# (kind, B, C, H, W): batch sweep at 3x224x224, channel sweep at B = 8, 56x56.
AFFINE = ([("batch", b, 3, 224, 224) for b in (1, 2, 4, 8, 16, 32, 64)]
          + [("channels", 8, c, 56, 56) for c in (1, 3, 8, 15, 16, 17, 32, 64, 128)])
AFFINE_KINDS = ("fwd", "fwd+bwd")

pytestmark = pytest.mark.skipif(not HAS_CPU, reason="compiled CPU kernels not built")


def _roles():
    """The anchor first, then ours under each variant."""
    return [("anchor", None)] + [("ours", v) for v in VARIANTS]


def _set_variant(monkeypatch, variant):
    if variant is not None:
        monkeypatch.setenv("STNPADIM_CPU_CAPABILITY", variant)


@functools.lru_cache(maxsize=None)
def _small_gaussian(dim: int):
    gen = torch.Generator().manual_seed(dim)
    g = sp.GaussianStats(16, dim).update(torch.randn(dim + 8, dim, 16, generator=gen)).finalize()
    factor = g.factor()
    return g, g.mean.T.contiguous(), factor.transpose(1, 2) @ factor


MAHALANOBIS = [(dim, batch, role, variant) for dim in DIMS for batch in BATCHES for role, variant in _roles()]


@pytest.mark.parametrize("dim,batch,role,variant", MAHALANOBIS,
                         ids=[f"C{c}-B{b}-{v or 'anchor'}" for c, b, _, v in MAHALANOBIS])
def test_mahalanobis_sweep(benchmark, monkeypatch, dim, batch, role, variant):
    _set_variant(monkeypatch, variant)
    gaussian, mean, inv_cov = _small_gaussian(dim) if benchmark.disabled else model(dim)
    patches = gaussian.num_patches
    emb = torch.randn(batch, dim, patches, generator=torch.Generator().manual_seed(batch)) + gaussian.mean.T
    fns = {"ours": lambda: sp.mahalanobis(emb, gaussian), "anchor": lambda: anomalib_distance(emb, mean, inv_cov)}
    if role == "ours":
        torch.testing.assert_close(fns["ours"](), fns["anchor"](), rtol=2e-3, atol=2e-3)
    anchor_case = f"mahalanobis-sweep:P{patches}-C{dim}-B{batch}"
    case = anchor_case if role == "anchor" else f"{anchor_case}-{variant}"
    packed = dim * (dim + 1) // 2
    benchmark.group = anchor_case
    benchmark.extra_info.update(role=role, case=case, anchor_case=anchor_case, variant=variant or "",
                                sweep="mahalanobis", sweep_key=f"C{dim}", sweep_x=batch,
                                flops=2.0 * patches * batch * (packed if role == "ours" else dim * dim),
                                bytes=4.0 * patches * (packed if role == "ours" else dim * dim))
    long = dim > 200 and batch > 16
    rounds = 1 if long and role == "anchor" else (2 if long else 3 if dim > 200 else 5)
    benchmark.pedantic(fns[role], rounds=rounds, warmup_rounds=0 if long else 1)


AFFINE_CASES = [(kind, shape, role, variant) for kind in AFFINE_KINDS for shape in AFFINE
                for role, variant in _roles()]


@pytest.mark.parametrize("kind,shape,role,variant", AFFINE_CASES,
                         ids=[f"{k}-{s[0]}-B{s[1]}-C{s[2]}-{s[3]}-{v or 'anchor'}" for k, s, _, v in AFFINE_CASES])
def test_affine_sample_sweep(benchmark, monkeypatch, kind, shape, role, variant):
    _set_variant(monkeypatch, variant)
    sweep, n, c, h, w = shape
    if benchmark.disabled:  # smoke run: same code paths (channel counts), small planes
        n, h, w = min(n, 2), 24, 20
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, c, h, w, generator=gen)
    theta = torch.eye(2, 3) + 0.1 * torch.randn(n, 2, 3, generator=gen)
    def make_call(fn):
        if kind == "fwd":
            return lambda: (fn(x, theta),)
        xr, tr = x.clone().requires_grad_(), theta.clone().requires_grad_()
        g = torch.ones(n, c, h, w)
        return lambda: torch.autograd.grad(fn(xr, tr), (xr, tr), g)

    call = make_call(affine_sample if role == "ours" else affine_sample_reference)
    if role == "ours":
        for a, b in zip(call(), make_call(affine_sample_reference)(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 + 1e-2 * b.abs().max().item())
    anchor_case = f"affine-sweep:{kind}-B{n}-C{c}-{h}x{w}"
    case = anchor_case if role == "anchor" else f"{anchor_case}-{variant}"
    image = 4.0 * n * c * h * w
    benchmark.group = anchor_case
    benchmark.extra_info.update(role=role, case=case, anchor_case=anchor_case, variant=variant or "",
                                sweep="affine_sample", sweep_key=f"{kind}-{sweep}",
                                sweep_x=n if sweep == "batch" else c, flops=0.0,
                                bytes=image * (2 if kind == "fwd" else 6))
    work = n * c * h * w * (1 if kind == "fwd" else 3)
    rounds = max(2, min(20, int(3e8 / max(work, 1) / 10)))
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)


def sweep_report(records: list[dict]) -> list[str]:
    """Lines of the sweep table per op, setting and variant: time and speed-up per size,
    with CLIFF where the speed-up falls by more than a third from the previous size and
    SLOWER where ours is slower than the anchor."""
    anchors = {r["extra_info"]["case"]: r["stats"]["min"] for r in records
               if r["extra_info"].get("sweep") and r["extra_info"]["role"] == "anchor"}
    series: dict[tuple, list] = {}
    for r in records:
        info = r["extra_info"]
        if not info.get("sweep") or info["role"] != "ours" or info["anchor_case"] not in anchors:
            continue
        key = (info["sweep"], info["sweep_key"], info["variant"])
        series.setdefault(key, []).append((info["sweep_x"], r["stats"]["min"], anchors[info["anchor_case"]]))
    lines = []
    for (op, setting, variant), rows in sorted(series.items()):
        rows.sort()
        lines.append(f"{op} {setting} [{variant}]: size, ours ms, anchor ms, speed-up")
        previous = None
        for x, ours, anchor in rows:
            ratio = anchor / ours
            flags = []
            if previous is not None and ratio < previous * 2 / 3:
                flags.append("CLIFF")
            if ratio < 1:
                flags.append("SLOWER")
            lines.append(f"  {x:>4} {1e3 * ours:>10.2f} {1e3 * anchor:>10.2f} {ratio:>7.2f}x {' '.join(flags)}")
            previous = ratio
    return lines
