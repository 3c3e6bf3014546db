"""sp.mahalanobis: the fused kernels against float64 numpy/scipy and the anomalib formulation."""
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import tolerances
import torch

import stnpadim_ext as sp
from stnpadim_ext import _backend
from stnpadim_ext.ops.mahalanobis import mahalanobis_reference
from stnpadim_ext.stats import pack_lower

HAS_CPU_KERNEL = _backend.has_kernel("mahalanobis", "cpu")
HAS_CUDA = torch.cuda.is_available() and _backend.has_kernel("mahalanobis", "cuda")
needs_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="extension not built")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")


def random_spd(rng, patches, dim, cond):
    """Covariances [P, C, C] with eigenvalues spread log-uniformly over `cond`."""
    covs = []
    for _ in range(patches):
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        eig = np.logspace(0, -np.log10(cond), dim) * rng.uniform(0.5, 2.0)
        covs.append((q * eig) @ q.T)
    return np.stack(covs)


def gaussian_from_cov(mean, cov):
    """PatchGaussian of float64 mean [P, C] / covariances [P, C, C], factored in float64."""
    factors = np.stack([scipy.linalg.solve_triangular(np.linalg.cholesky(c), np.eye(len(c)), lower=True)
                        for c in cov])
    return sp.PatchGaussian(torch.from_numpy(mean).float(), pack_lower(torch.from_numpy(factors)).float())


def random_gaussian(patches, dim, seed=0):
    rng = np.random.default_rng(seed)
    return gaussian_from_cov(rng.standard_normal((patches, dim)), random_spd(rng, patches, dim, 10.0))


# Without the kernels the fallback is the anomalib formulation, which loses ~1e-3 at 1e6.
@pytest.mark.parametrize("cond", [1.0, 1e3, pytest.param(1e6, marks=needs_kernel)])
def test_float32_matches_float64_scipy_on_ill_conditioned_covariances(cond):
    rng = np.random.default_rng(int(np.log10(cond)) + 1)
    patches, dim, batch = 4, 24, 6
    mean = rng.standard_normal((patches, dim))
    cov = random_spd(rng, patches, dim, cond)
    g = gaussian_from_cov(mean, cov)
    # Samples of the patch's own distribution, some scaled out to anomalies.
    z = rng.standard_normal((batch, patches, dim)) * rng.uniform(0.5, 20.0, (batch, 1, 1))
    x = mean + np.einsum("pij,bpj->bpi", np.linalg.cholesky(cov), z)
    emb = torch.from_numpy(x).float().permute(0, 2, 1)            # [B, C, P]

    got = sp.mahalanobis(emb, g)

    x32, mean32 = emb.double().numpy(), g.mean.double().numpy()
    want = np.array([[scipy.spatial.distance.mahalanobis(x32[b, :, p], mean32[p], np.linalg.inv(cov[p]))
                      for p in range(patches)] for b in range(batch)])
    assert got.dtype == torch.float32 and got.shape == (batch, patches)
    rel = np.abs(got.double().numpy() - want) / want
    assert rel.max() < 1e-4, rel.max()


@pytest.mark.parametrize("batch", [0, 1, 2, 3, 8, 9, 16, 17, 33])
@pytest.mark.parametrize("dim,patches", [(1, 3), (7, 5), (17, 70), (40, 9)])
def test_matches_reference_for_odd_sizes(batch, dim, patches):
    g = random_gaussian(patches, dim, seed=batch * 100 + dim)
    emb = torch.randn(batch, dim, patches) * 3 + g.mean.T
    got = sp.mahalanobis(emb, g)
    want = mahalanobis_reference(emb.double(), g)
    assert got.shape == (batch, patches)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-5)


# B = 1 takes its own path (one dot product per factor row); 70 patches span two blocks.
@pytest.mark.parametrize("dim", [1, 2, 3, 8, 15, 16, 17, 33])
def test_single_embedding_matches_reference(dim):
    g = random_gaussian(70, dim, seed=1000 + dim)
    emb = torch.randn(1, dim, 70, dtype=torch.float64) * 3 + g.mean.T
    patch_inner = emb.permute(2, 0, 1).contiguous().permute(1, 2, 0)          # stride_p = C
    strided = torch.randn(1, 2 * dim, 140, dtype=torch.float64)[:, ::2, ::2].copy_(emb)
    for variant in (emb, patch_inner, strided):
        want = mahalanobis_reference(variant, g)
        torch.testing.assert_close(sp.mahalanobis(variant, g), want, rtol=1e-12, atol=1e-12)
        want32 = mahalanobis_reference(variant.float().double(), g)
        got32 = sp.mahalanobis(variant.float(), g)
        assert got32.dtype == torch.float32
        torch.testing.assert_close(got32.double(), want32, rtol=2e-5, atol=1e-5)


def test_float64_input_is_computed_and_returned_in_float64():
    g = random_gaussian(6, 19, seed=3)
    emb = torch.randn(5, 19, 6, dtype=torch.float64)
    got = sp.mahalanobis(emb, g)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, mahalanobis_reference(emb, g), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_gives_float32(dtype):
    g = random_gaussian(5, 12, seed=4)
    emb = torch.randn(4, 12, 5).to(dtype)
    got = sp.mahalanobis(emb, g)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), mahalanobis_reference(emb.double(), g), rtol=1e-5, atol=1e-5)


def test_image_shaped_and_non_contiguous_inputs_agree():
    g = random_gaussian(4 * 5, 9, seed=5)
    emb = torch.randn(7, 9, 4, 5)
    want = sp.mahalanobis(emb.contiguous(), g)
    channels_last = emb.to(memory_format=torch.channels_last)
    strided = torch.randn(7, 18, 40)[:, ::2, ::2].copy_(emb.flatten(2))  # strides (720, 80, 2)
    batch_inner = emb.flatten(2).permute(2, 0, 1).contiguous().permute(1, 2, 0)
    for variant in (channels_last, strided, batch_inner, emb.flatten(2)):
        torch.testing.assert_close(sp.mahalanobis(variant, g), want, rtol=1e-6, atol=1e-6)


def test_model_size_is_at_most_055_of_a_full_inverse_covariance():
    g = random_gaussian(3, 100, seed=6)
    stored = sum(t.numel() * t.element_size() for t in g.state_dict().values())
    assert stored <= 0.55 * g.num_patches * g.dim * g.dim * 4


def test_bad_inputs_are_rejected_with_clear_messages():
    g = random_gaussian(6, 8, seed=7)
    with pytest.raises(ValueError, match="C=5 channels and P=6 patches"):
        sp.mahalanobis(torch.randn(2, 5, 6), g)
    with pytest.raises(ValueError, match="P=12 patches"):
        sp.mahalanobis(torch.randn(2, 8, 3, 4), g)
    with pytest.raises(ValueError, match="floating-point"):
        sp.mahalanobis(torch.ones(2, 8, 6, dtype=torch.int64), g)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\] or \[B, C, P\]"):
        sp.mahalanobis(torch.randn(8, 6), g)
    with pytest.raises(ValueError, match="is on meta but the gaussian is on cpu"):
        sp.mahalanobis(torch.randn(2, 8, 6, device="meta"), g)
    with pytest.raises(TypeError, match="PatchGaussian"):
        sp.mahalanobis(torch.randn(2, 8, 6), {"mean": g.mean})
    with pytest.raises(RuntimeError, match="inference-only"):
        sp.mahalanobis(torch.randn(2, 8, 6, requires_grad=True), g)
    with torch.no_grad():
        assert sp.mahalanobis(torch.randn(2, 8, 6, requires_grad=True), g).shape == (2, 6)


@needs_kernel
def test_op_checks_name_the_argument():
    g = random_gaussian(6, 8, seed=8)
    op = torch.ops.stnpadim.mahalanobis.default
    emb = torch.randn(2, 8, 6)
    with pytest.raises(RuntimeError, match="mean must be float32"):
        op(emb, g.mean.double(), g.factor_packed)
    with pytest.raises(RuntimeError, match=r"factor_packed must have shape \[P, C\(C\+1\)/2\] = \[6, 36\]"):
        op(emb, g.mean, g.factor_packed[:, :-1])
    with pytest.raises(RuntimeError, match=r"mean must have shape \[P, C\]"):
        op(emb, g.mean[:5], g.factor_packed)
    with pytest.raises(RuntimeError, match=r"emb must have shape \[B, C, P\]"):
        op(emb[0], g.mean, g.factor_packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_bfloat16_factor_is_read_widened_and_close_to_float32(dtype):
    g = random_gaussian(70, 37, seed=11)
    g16 = g.with_factor_dtype(torch.bfloat16)
    assert g16.factor_packed.dtype == torch.bfloat16 and g16.mean is g.mean
    assert g16.factor_packed.element_size() * 2 == g.factor_packed.element_size()
    for batch in (1, 9, 33):
        emb = (torch.randn(batch, 37, 70, dtype=torch.float64) * 2 + g.mean.T).to(dtype)
        got = sp.mahalanobis(emb, g16)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        # Exactly the widened factor's distances, as float32 (or float64) computes them ...
        want = mahalanobis_reference(emb.double(), g16)
        rtol, atol = tolerances.mahalanobis_tolerance(emb, g16, want)
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
        # ... and within bfloat16's rounding (2^-9 per element, averaging out) of float32's.
        exact = mahalanobis_reference(emb.double(), g)
        assert ((got.double() - exact).abs() / exact).max() < 2**-8


def test_factor_dtype_other_than_float32_or_bfloat16_is_refused():
    with pytest.raises(sp.InputError, match="torch.float32 or torch.bfloat16"):
        random_gaussian(3, 4).with_factor_dtype(torch.float16)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype, factor_dtype):
    g = random_gaussian(5, 6, seed=9).with_factor_dtype(factor_dtype)
    for emb in (torch.randn(3, 6, 5, dtype=dtype), torch.randn(6, 3, 5, dtype=dtype).transpose(0, 1)):
        torch.library.opcheck(torch.ops.stnpadim.mahalanobis.default, (emb, g.mean, g.factor_packed))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    for batch, dim, patches in [(1, 3, 5), (9, 37, 11), (33, 100, 7), (8, 550, 3)]:
        g32 = random_gaussian(patches, dim, seed=batch + dim)
        emb = (torch.randn(batch, dim, patches) * 2 + g32.mean.T).to(dtype)
        for g in (g32, g32.with_factor_dtype(torch.bfloat16)):
            want = mahalanobis_reference(emb.double(), g)
            got = sp.mahalanobis(emb.cuda()[:, :, :], g.to("cuda")).cpu()
            assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
            strided = emb.cuda().permute(2, 0, 1).contiguous().permute(1, 2, 0)
            torch.testing.assert_close(sp.mahalanobis(strided, g.to("cuda")).cpu(), got)


DEVICES = [pytest.param("cpu", marks=needs_kernel), pytest.param("cuda", marks=[needs_cuda, pytest.mark.cuda])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,dim", [(1, 37), (9, 37), (3, 5)])
def test_inf_embedding_gives_inf_not_nan(device, batch, dim):
    """Zero-padded factor entries must not meet an Inf as 0 * Inf = NaN."""
    g = random_gaussian(4, dim, seed=dim)
    emb = torch.randn(batch, dim, 4) + g.mean.T
    emb[0, dim // 2, 1] = float("inf")
    got = sp.mahalanobis(emb.to(device), g.to(device)).cpu()
    assert got[0, 1] == float("inf")
    keep = torch.ones_like(got, dtype=torch.bool)
    keep[0, 1] = False
    torch.testing.assert_close(got[keep], mahalanobis_reference(emb.double(), g).float()[keep],
                               rtol=1e-4, atol=1e-4)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,dim", [(torch.float32, 1600), (torch.float64, 800)])
def test_cuda_shared_memory_opt_in_path(dtype, dim):
    """More than 48 KiB of staged embeddings per block needs the opt-in shared memory."""
    rng = np.random.default_rng(dim)
    mean = rng.standard_normal((2, dim))
    cov = np.stack([np.eye(dim) * rng.uniform(0.5, 2.0, dim) for _ in range(2)])
    g = gaussian_from_cov(mean, cov)
    emb = (torch.randn(10, dim, 2) + g.mean.T).to(dtype)
    got = sp.mahalanobis(emb.cuda(), g.to("cuda")).cpu()
    torch.testing.assert_close(got.double(), mahalanobis_reference(emb.double(), g), rtol=1e-4, atol=1e-4)


@needs_cuda
@pytest.mark.cuda
def test_cuda_non_default_stream():
    g = random_gaussian(6, 40, seed=3).to("cuda")
    emb = torch.randn(12, 40, 6, device="cuda") + g.mean.T
    want = sp.mahalanobis(emb, g)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = sp.mahalanobis(emb, g)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_cuda_non_default_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernel runs on the tensors' device."""
    g = random_gaussian(6, 40, seed=4)
    emb = torch.randn(12, 40, 6) + g.mean.T
    assert torch.cuda.current_device() == 0
    got = sp.mahalanobis(emb.to("cuda:1"), g.to("cuda:1"))
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got.cpu().double(), mahalanobis_reference(emb.double(), g), rtol=1e-4, atol=1e-4)
