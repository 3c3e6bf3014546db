"""CPU kernel variants: the dispatch names and honours STNPADIM_CPU_CAPABILITY, refuses what
the CPU cannot run, and every variant this CPU runs agrees with the float64 references.

Each variant has its own vector and tile widths (16 / 32 / 64-byte vectors, one- and
two-register batch tiles, dot products for lone elements), so the batch sizes below cross
every tile boundary of every variant: 0..40 and a few beyond.
"""
import pytest
import tolerances
import torch

import stnpadim_ext as sp
from stnpadim_ext import _backend
from stnpadim_ext.ops.mahalanobis import mahalanobis_reference

pytestmark = pytest.mark.skipif(not _backend.has_kernel("mahalanobis", "cpu"),
                                reason="stnpadim_ext._C (CPU kernels) not built")

ALL = ("default", "avx2", "avx512")
RUNNABLE = _backend.cpu_capabilities()


@pytest.fixture(params=RUNNABLE)
def capability(request, monkeypatch):
    """Runs the test under each variant this CPU can run."""
    monkeypatch.setenv("STNPADIM_CPU_CAPABILITY", request.param)
    return request.param


def test_best_variant_is_used_by_default(monkeypatch):
    monkeypatch.delenv("STNPADIM_CPU_CAPABILITY", raising=False)
    info = sp.backend_info()
    assert info["cpu_capabilities"] == RUNNABLE
    assert RUNNABLE[0] == "default" and set(RUNNABLE) <= set(ALL)
    assert info["cpu_capability"] == RUNNABLE[-1]
    # What the CPU reports agrees with the variants offered (x86-64 Linux only).
    try:
        flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
    except (OSError, IndexError):
        return
    if "avx512f" in flags and "avx512bw" in flags and "avx512vl" in flags and "avx512dq" in flags:
        assert "avx512" in RUNNABLE
    if "avx2" in flags and "fma" in flags:
        assert "avx2" in RUNNABLE
    if "avx2" not in flags:
        assert RUNNABLE == ["default"]


def test_env_forces_the_variant(capability):
    assert sp.backend_info()["cpu_capability"] == capability


def test_env_is_case_insensitive(monkeypatch):
    monkeypatch.setenv("STNPADIM_CPU_CAPABILITY", RUNNABLE[-1].upper())
    assert sp.backend_info()["cpu_capability"] == RUNNABLE[-1]


def test_unknown_variant_is_refused(monkeypatch):
    monkeypatch.setenv("STNPADIM_CPU_CAPABILITY", "sse9")
    with pytest.raises(RuntimeError, match="must be default, avx2 or avx512.*got 'sse9'"):
        sp.backend_info()
    emb = torch.randn(2, 3, 4)
    g = sp.GaussianStats(4, 3).update(torch.randn(10, 3, 4)).finalize()
    with pytest.raises(RuntimeError, match="STNPADIM_CPU_CAPABILITY"):
        sp.mahalanobis(emb, g)


@pytest.mark.skipif(len(RUNNABLE) == len(ALL), reason="this CPU runs every variant")
def test_variant_the_cpu_cannot_run_is_refused(monkeypatch):
    missing = ALL[len(RUNNABLE)]
    monkeypatch.setenv("STNPADIM_CPU_CAPABILITY", missing)
    match = f"STNPADIM_CPU_CAPABILITY={missing} asks for the {missing} kernels, but this CPU lacks"
    with pytest.raises(RuntimeError, match=match):
        sp.backend_info()
    x, theta = torch.rand(1, 2, 5, 5), torch.eye(2, 3)[None]
    with pytest.raises(RuntimeError, match=match):
        sp.affine_sample(x, theta)
    g = sp.GaussianStats(4, 3).update(torch.randn(10, 3, 4)).finalize()
    with pytest.raises(RuntimeError, match=match):
        sp.mahalanobis(torch.randn(2, 3, 4), g)


def _gaussian(patches, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    train = torch.randn(dim + 8, dim, patches, generator=gen, dtype=torch.float64)
    train = train * torch.rand(1, dim, 1, generator=gen, dtype=torch.float64) * 3
    return sp.GaussianStats(patches, dim).update(train).finalize()


@pytest.mark.parametrize("dim", [1, 3, 8, 13, 24, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16])
def test_mahalanobis_every_batch_size(capability, dim, dtype, factor_dtype):
    g = _gaussian(7, dim, dim).with_factor_dtype(factor_dtype)  # the reference reads it widened
    emb = (torch.randn(97, dim, 7, dtype=torch.float64) * 2 + g.mean.T.double()).to(dtype)
    want = mahalanobis_reference(emb.double(), g)
    rtol, atol = tolerances.mahalanobis_tolerance(emb, g, want)
    for batch in [*range(41), 47, 64, 65, 97]:
        got = sp.mahalanobis(emb[:batch], g)
        assert got.shape == (batch, 7)
        torch.testing.assert_close(got.double(), want[:batch], rtol=rtol, atol=atol,
                                   msg=lambda m, b=batch: f"B={b}: {m}")


@pytest.mark.parametrize("batch", [8, 9, 24, 32, 48])
def test_mahalanobis_tiles_staged_eight_patches_at_a_time(capability, batch):
    # Float32 [B, C, P] input (patches contiguous) stages full 8-lane tiles 8 patches at a
    # time in the AVX2 and AVX-512 variants: 21 patches are two such groups and 5 single
    # patches; B = 9 adds a lone element, which stages patch by patch.
    g = _gaussian(21, 13, batch)
    emb = torch.randn(batch, 13, 21) * 2 + g.mean.T
    want = mahalanobis_reference(emb.double(), g)
    rtol, atol = tolerances.mahalanobis_tolerance(emb, g, want)
    torch.testing.assert_close(sp.mahalanobis(emb, g).double(), want, rtol=rtol, atol=atol)
    sliced = torch.randn(batch, 13, 42)[:, :, ::2].copy_(emb)  # patches strided: element by element
    torch.testing.assert_close(sp.mahalanobis(sliced, g).double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("batch", [4, 8, 16, 32])
def test_mahalanobis_every_row_block_remainder(capability, batch):
    # Batch tiles run the factor's rows in blocks (6 or 8 rows, by tile kind and variant);
    # the rows left over run as one smaller block, of each size from 1 to 7 here.
    for dim in range(1, 18):
        g = _gaussian(3, dim, dim)
        emb = torch.randn(batch, dim, 3) * 2 + g.mean.T
        want = mahalanobis_reference(emb.double(), g)
        rtol, atol = tolerances.mahalanobis_tolerance(emb, g, want)
        torch.testing.assert_close(sp.mahalanobis(emb, g).double(), want, rtol=rtol, atol=atol,
                                   msg=lambda m, c=dim: f"C={c}: {m}")


@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16])
def test_mahalanobis_strided_large_dim(capability, factor_dtype):
    """C = 200 spans two factor panels; [B, P, C] memory (stride_c = 1) and a batch slice,
    whose lone element's rows (1 to 200 long) end at every point of the unrolled dot product."""
    g = _gaussian(5, 200, 0).with_factor_dtype(factor_dtype)
    base = torch.randn(40, 5, 200) * 2 + g.mean
    emb = base.permute(0, 2, 1)[::2]                                 # [20, 200, 5], strided
    want = mahalanobis_reference(emb.double(), g)
    rtol, atol = tolerances.mahalanobis_tolerance(emb, g, want)
    torch.testing.assert_close(sp.mahalanobis(emb, g).double(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(sp.mahalanobis(emb[:1], g).double(), want[:1], rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("shape", [(2, 3, 9, 12), (1, 20, 7, 10)])  # 20 channels: the interleaved kernels
def test_affine_sample_forward_and_backward(capability, mode, padding_mode, shape):
    x = torch.rand(*shape)
    theta = torch.eye(2, 3) + 0.3 * torch.randn(shape[0], 2, 3)
    size = (8, 11)
    if mode == "nearest":  # every pick unambiguous, so gradients compare too
        for _ in range(50):
            if tolerances.decided(theta, shape, size, False).all():
                break
            theta = torch.eye(2, 3) + 0.3 * torch.randn(shape[0], 2, 3)
    g = torch.randn(shape[0], shape[1], *size)
    xs, ts = x.clone().requires_grad_(), theta.clone().requires_grad_()
    out = sp.affine_sample(xs, ts, size, mode, padding_mode)
    want = tolerances.truth(x, theta, size, mode, padding_mode, False)
    rtol, atol = tolerances.forward_tolerance(x, theta, mode)
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol)
    gx, gt = torch.autograd.grad(out, (xs, ts), g)
    wx, wt = tolerances.truth_grads(x, theta, g, size, mode, padding_mode, False)
    rtol, atol = tolerances.grad_x_tolerance(x, theta, g, size, mode, padding_mode, False)
    torch.testing.assert_close(gx.double(), wx, rtol=rtol, atol=atol)
    rtol, atol = tolerances.grad_theta_tolerance(x, theta, g, size, mode)
    torch.testing.assert_close(gt.double(), wt, rtol=rtol, atol=atol)


@pytest.mark.parametrize("size", [(184, 184), (181, 183)])
def test_affine_sample_large_many_channel_output(capability, size):
    # Outputs of 16 MB or more leave the many-channel forward with streaming stores where
    # the planes are 32-byte aligned (184 x 184) and with plain stores where not (181 x 183);
    # 64 channels of 184 x 184 make blocks of 22 and 20, which reach the transposes' edges.
    x = torch.rand(2, 64, 184, 184)
    theta = torch.eye(2, 3) + 0.1 * torch.randn(2, 2, 3)
    out = sp.affine_sample(x, theta, size)
    assert out.numel() * out.element_size() >= 16 << 20
    want = tolerances.truth(x, theta, size, "bilinear", "zeros", False)
    rtol, atol = tolerances.forward_tolerance(x, theta, "bilinear")
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol)
