"""Property-based tests (Hypothesis): the ops against float64 truths over a matrix of dtypes
(float16, bfloat16, float32, float64), layouts (contiguous, channels_last, sliced /
strided, expanded batch), sizes (1 pixel to a few hundred, odd), modes, paddings and
align_corners, on the CPU (every instruction-set variant this CPU runs) and on CUDA where
present.

Tolerances come from tests/tolerances.py: each is derived from the rounding the op does
at the size drawn, so they hold on any CPU. Every drawn tensor comes from a `seed` that is
part of the example: Hypothesis prints it (and a reproduction blob) on failure.
STNPADIM_HYPOTHESIS_EXAMPLES scales the example counts (default 1; CI keeps it modest).
"""
from __future__ import annotations

import contextlib
import math
import os

import pytest
import tolerances
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stnpadim_ext as sp
from stnpadim_ext import _backend
from stnpadim_ext.ops.affine_sample import affine_sample

pytestmark = pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid:UserWarning")

SCALE = float(os.environ.get("STNPADIM_HYPOTHESIS_EXAMPLES", "1"))
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LAYOUTS = ["contiguous", "channels_last", "sliced", "expanded"]
MODES = ["bilinear", "nearest", "bicubic"]
PADDINGS = ["zeros", "border", "reflection"]
HAS_CPU = _backend.has_kernel("affine_sample", "cpu")
HAS_CUDA = torch.cuda.is_available() and _backend.has_kernel("affine_sample", "cuda")
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU, reason="CPU kernels not built")),
           pytest.param("cuda", marks=[pytest.mark.cuda,
                                       pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")])]
CAPABILITIES = _backend.cpu_capabilities()


def examples(n: int) -> settings:
    return settings(max_examples=max(1, round(n * SCALE)), deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextlib.contextmanager
def cpu_capability(device: str, name: str):
    """STNPADIM_CPU_CAPABILITY=name for the CPU kernels (a no-op on CUDA)."""
    old = os.environ.get("STNPADIM_CPU_CAPABILITY")
    if device == "cpu":
        os.environ["STNPADIM_CPU_CAPABILITY"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("STNPADIM_CPU_CAPABILITY", None)
        else:
            os.environ["STNPADIM_CPU_CAPABILITY"] = old


# 1 pixel to a few hundred; small odd sizes most often (they reach every edge case).
sizes = st.one_of(st.integers(1, 9), st.integers(10, 70), st.sampled_from([127, 200, 301]))


def layout(base: torch.Tensor, name: str, n: int) -> torch.Tensor:
    """A view of base's data in the given layout, with n images; base is [n, C, 2H, 2W]
    (sliced reads every other row and column) or [1, C, H, W] (expanded)."""
    if name == "expanded":
        return base[:1].expand(n, -1, -1, -1)
    if name == "sliced":
        return base[:, :, 1::2, ::2]
    if name == "channels_last":
        return base.contiguous(memory_format=torch.channels_last)
    return base.contiguous()


def theta_from(angle, scale, shear, tx, ty, n, gen, dtype, device):
    """Similarity + shear per image, jittered from the drawn parameters."""
    jitter = torch.randn(n, 5, generator=gen, dtype=torch.float64) * 0.05
    a, s, h = angle + jitter[:, 0], scale * (1 + jitter[:, 1]), shear + jitter[:, 2]
    cos, sin = torch.cos(a) * s, torch.sin(a) * s
    theta = torch.stack([torch.stack([cos, -sin + h, tx + jitter[:, 3]], -1),
                         torch.stack([sin, cos, ty + jitter[:, 4]], -1)], 1)
    return theta.to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@examples(60)
@given(dtype=st.sampled_from(DTYPES), layout_name=st.sampled_from(LAYOUTS), n=st.integers(1, 3),
       c=st.sampled_from([1, 2, 3, 5, 17]), h=sizes, w=sizes, ho=sizes, wo=sizes,
       mode=st.sampled_from(MODES), padding_mode=st.sampled_from(PADDINGS), align_corners=st.booleans(),
       angle=st.floats(-math.pi, math.pi), scale=st.floats(0.3, 3.0), shear=st.floats(-0.3, 0.3),
       tx=st.floats(-1.5, 1.5), ty=st.floats(-1.5, 1.5), capability=st.sampled_from(CAPABILITIES),
       seed=st.integers(0, 2**31 - 1))
def test_affine_sample_matches_float64_truth(device, dtype, layout_name, n, c, h, w, ho, wo, mode, padding_mode,
                                             align_corners, angle, scale, shear, tx, ty, capability, seed):
    # Keep each example small enough for the float64 truth and its gradients.
    while c * h * w > 60_000 or c * ho * wo > 60_000:
        h, w, ho, wo = max(1, h // 2), max(1, w // 2), max(1, ho // 2), max(1, wo // 2)
    gen = torch.Generator().manual_seed(seed)
    shape = (1 if layout_name == "expanded" else n, c, 2 * h if layout_name == "sliced" else h,
             2 * w if layout_name == "sliced" else w)
    base = (torch.rand(shape, generator=gen, dtype=torch.float64) * 4 - 2).to(device=device, dtype=dtype)
    x = layout(base, layout_name, n)
    assert x.shape == (n, c, h, w)
    theta = theta_from(angle, scale, shear, tx, ty, n, gen, dtype, device)
    g = torch.randn(n, c, ho, wo, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    size = (ho, wo)

    base_grad = base.detach().requires_grad_()
    x_in = layout(base_grad, layout_name, n)
    theta_in = theta.detach().requires_grad_()
    with cpu_capability(device, capability):
        out = affine_sample(x_in, theta_in, size, mode, padding_mode, align_corners)
    assert out.shape == (n, c, ho, wo) and out.dtype == dtype and out.device == x.device

    # Finite wherever torch's float32 composition is (x and theta as given, upcast).
    grid32 = F.affine_grid(theta.float(), (n, c, *size), align_corners=align_corners)
    torch32 = F.grid_sample(x.float(), grid32, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    assert out[torch32.isfinite()].isfinite().all()

    want = tolerances.truth(x, theta, size, mode, padding_mode, align_corners)
    keep = torch.ones_like(want, dtype=torch.bool)
    if mode == "nearest":  # picks within rounding of a half-pixel may go either way
        margin = max(1e-6, 2 * tolerances.coordinate_error(theta, x.shape, dtype))
        keep = tolerances.decided(theta, x.shape, size, align_corners, margin).expand_as(want)
    rtol, atol = tolerances.forward_tolerance(x, theta, mode)
    torch.testing.assert_close(out.double()[keep], want[keep], rtol=rtol, atol=atol)

    g = torch.where(keep, g.double(), 0).to(dtype)
    with cpu_capability(device, capability):
        gx, gt = torch.autograd.grad(out, (x_in, theta_in), g)
    assert gx.dtype == dtype and gt.dtype == dtype
    wx, wt = tolerances.truth_grads(x, theta, g, size, mode, padding_mode, align_corners)
    # A gradient past the dtype's range rounds to +-inf, as the truth itself would (theta's
    # sums over many float16 outputs reach it): both sides are compared clamped to the range.
    big = torch.finfo(dtype).max
    rtol, atol = tolerances.grad_x_tolerance(x, theta, g, size, mode, padding_mode, align_corners)
    torch.testing.assert_close(gx.double().clamp(-big, big), wx.clamp(-big, big), rtol=rtol, atol=atol)
    rtol, atol = tolerances.grad_theta_tolerance(x, theta, g, size, mode)
    torch.testing.assert_close(gt.double().clamp(-big, big), wt.clamp(-big, big), rtol=rtol, atol=atol)


def emb_layout(base: torch.Tensor, name: str, batch: int, dim: int, hw) -> torch.Tensor:
    """Embeddings [B, C, H, W] in the given layout from base (see layout())."""
    if name == "expanded":
        return base[:1].expand(batch, -1, -1, -1)
    if name == "sliced":
        return base[:, :, ::2, 1::2]
    if name == "channels_last":
        return base.contiguous(memory_format=torch.channels_last)
    return base.contiguous()


@pytest.mark.parametrize("device", DEVICES)
@examples(40)
@given(dtype=st.sampled_from(DTYPES), layout_name=st.sampled_from(LAYOUTS), batch=st.integers(0, 70),
       dim=st.one_of(st.integers(1, 20), st.integers(21, 90)), h=st.integers(1, 7), w=st.integers(1, 7),
       chunks=st.integers(1, 4), spread=st.floats(0.1, 30.0), offset=st.floats(-100.0, 100.0),
       eps=st.sampled_from([0.01, 0.1, 1.0]), capability=st.sampled_from(CAPABILITIES),
       factor_dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_gaussian_stats_and_mahalanobis_match_float64(device, dtype, layout_name, batch, dim, h, w, chunks,
                                                      spread, offset, eps, capability, factor_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    patches = h * w
    # Training embeddings: correlated channels around a large offset (Chan's update must
    # keep the covariance accurate), fed in `chunks` updates, half merged from a second
    # GaussianStats.
    n_train = max(2, dim // 2 + 3)
    mix = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    train = (torch.einsum("ij,njp->nip", mix, torch.randn(n_train, dim, patches, generator=gen,
                                                           dtype=torch.float64)) * spread + offset)
    train = train.to(dtype).view(n_train, dim, h, w).to(device)
    first, second = sp.GaussianStats(patches, dim), sp.GaussianStats(patches, dim)
    for k, part in enumerate(train.chunk(chunks)):
        (first if k % 2 == 0 else second).update(part)
    stats = first.merge(second) if second.count else first
    assert stats.count == n_train

    t = train.double().flatten(2)                                              # [N, C, P]
    mean = t.mean(0)                                                           # [C, P]
    centred = (t - mean).permute(2, 1, 0)                                      # [P, C, N]
    cov = centred @ centred.transpose(1, 2) / (n_train - 1)                    # [P, C, C]
    # float64 statistics: a few hundred roundings of magnitude |t| ~ |offset| + spread.
    mag = t.abs().max().item()
    torch.testing.assert_close(stats.covariance(0.0).double(), cov, rtol=0, atol=1e-10 * mag * mag * n_train)

    gaussian = stats.finalize(eps=eps)
    precision = torch.linalg.inv(cov + eps * torch.eye(dim, dtype=torch.float64, device=cov.device))
    factor = gaussian.factor().double()
    # float32 factor entries: relative rounding u32 each, amplified by the condition number.
    cond = torch.linalg.cond(cov + eps * torch.eye(dim, dtype=torch.float64, device=cov.device)).max().item()
    prec_err = (factor.transpose(1, 2) @ factor - precision).abs().max().item()
    assert prec_err <= 8 * dim * tolerances.unit_roundoff(torch.float32) * cond * precision.abs().max().item()
    # A bfloat16 factor is read widened, exactly: the truth below uses the same rounded factor.
    gaussian = gaussian.with_factor_dtype(factor_dtype)
    factor = gaussian.factor().double()

    base_shape = (1 if layout_name == "expanded" else batch, dim,
                  2 * h if layout_name == "sliced" else h, 2 * w if layout_name == "sliced" else w)
    base = torch.randn(base_shape, generator=gen, dtype=torch.float64) * spread * 2 + offset
    emb = emb_layout(base.to(dtype).to(device), layout_name, batch, dim, (h, w))
    if batch == 0 and layout_name == "expanded":
        emb = emb[:0]
    assert emb.shape == (batch, dim, h, w)
    with cpu_capability(device, capability):
        got = sp.mahalanobis(emb, gaussian)
    assert got.shape == (batch, patches)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    d = emb.double().flatten(2) - gaussian.mean.double().T[None]               # [B, C, P]
    want = (torch.einsum("pij,bjp->bip", factor, d).square().sum(1)).sqrt()    # [B, P]
    assert got.isfinite().all()
    rtol, atol = tolerances.mahalanobis_tolerance(emb, gaussian, want)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
