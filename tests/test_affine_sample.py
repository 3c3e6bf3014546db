"""affine_sample against torch's F.grid_sample(F.affine_grid(...)) composition.

Every test draws fresh random inputs. CPU tests need the compiled extension (they skip
when it is not built); CUDA tests skip without a GPU.
"""
import itertools
import math
import os
import subprocess
import sys

import pytest
import tolerances
import torch
import torch.nn.functional as F

import stnpadim_ext as sp
from stnpadim_ext import _backend
from stnpadim_ext.errors import InputError
from stnpadim_ext.ops.affine_sample import AffineSample, affine_sample, affine_sample_reference

# The reference's affine_grid warns about 1-pixel outputs with align_corners; we test them on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid:UserWarning")

MODES = ("bilinear", "nearest", "bicubic")
PADDINGS = ("zeros", "border", "reflection")
COMBOS = list(itertools.product(MODES, PADDINGS, (False, True)))
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

needs_kernel = pytest.mark.skipif(not _backend.has_kernel("affine_sample", "cpu"),
                                  reason="stnpadim_ext._C (CPU kernels) not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_cuda_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and _backend.has_kernel("affine_sample", "cuda")),
    reason="needs a CUDA device and the CUDA kernels")


def random_theta(n, dtype=torch.float32, device="cpu", spread=0.4):
    """Near-identity affine matrices with random rotation, scale, shear and translation."""
    return torch.eye(2, 3, dtype=dtype, device=device) + spread * torch.randn(n, 2, 3, dtype=dtype, device=device)


def theta_off_kinks(n, in_size, out_size, align_corners=False, device="cpu"):
    """random_theta (float64) redrawn until no sampling point lies within 1e-3 pixel of a
    multiple of half a pixel: the pixel centres and padding folds where sampling has a kink,
    and gradcheck's finite differences (a 1e-6 step) would straddle it (torch's own
    grid_sample fails gradcheck there too)."""
    while True:
        theta = random_theta(n, torch.float64, device)
        grid = F.affine_grid(theta, (n, 1, *out_size), align_corners=align_corners)
        sizes = torch.tensor([in_size[1], in_size[0]], dtype=torch.float64, device=device)
        coords = (grid + 1) / 2 * (sizes - 1) if align_corners else ((grid + 1) * sizes - 1) / 2
        if ((2 * coords - (2 * coords).round()).abs() / 2 > 1e-3).all():
            return theta


def similarity(angle, scale, tx, ty, dtype=torch.float64):
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return torch.tensor([[c, -s, tx], [s, c, ty]], dtype=dtype)


def decided(theta, x_shape, size, align_corners, margin=1e-3):
    """Output pixels whose nearest-neighbour pick is unambiguous (tolerances.decided)."""
    return tolerances.decided(theta, x_shape, size, align_corners, margin)


def assert_matches_reference(out, ref, theta, x, size, mode, align_corners, tol):
    if mode == "nearest":
        keep = decided(theta, x.shape, size, align_corners).expand_as(out)
        assert keep.float().mean() >= 0.5  # the comparison must cover most pixels
        out, ref = out[keep], ref[keep]
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)


# ----------------------------------------------------------------------------- forward

@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS)
def test_forward_matches_composition(mode, padding_mode, align_corners, dtype):
    x = torch.rand(3, 2, 9, 12, dtype=dtype)
    theta = random_theta(3, dtype)
    out = affine_sample(x, theta, (7, 13), mode, padding_mode, align_corners)
    ref = affine_sample_reference(x, theta, (7, 13), mode, padding_mode, align_corners)
    assert out.shape == (3, 2, 7, 13) and out.dtype == dtype and out.is_contiguous()
    assert_matches_reference(out, ref, theta, x, (7, 13), mode, align_corners, TOL[dtype])


@needs_kernel
@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS)
def test_large_rotations_scales_and_translations(mode, padding_mode, align_corners):
    angles = torch.empty(6).uniform_(-math.pi, math.pi).tolist()
    params = zip(angles, (0.3, 2.5, 1.0, 0.7, 4.0, 1.3), (0.0, 0.4, 3.0, -2.5, 0.0, 1.7),
                 (0.0, -0.3, 0.0, 2.0, -3.5, -1.1), strict=True)
    theta = torch.stack([similarity(a, s, tx, ty) for a, s, tx, ty in params])
    x = torch.rand(6, 3, 11, 14, dtype=torch.float64)
    out = affine_sample(x, theta, (10, 9), mode, padding_mode, align_corners)
    ref = affine_sample_reference(x, theta, (10, 9), mode, padding_mode, align_corners)
    assert_matches_reference(out, ref, theta, x, (10, 9), mode, align_corners, 1e-10)


@needs_kernel
@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS)
@pytest.mark.parametrize("shape,size", [((1, 1, 1, 1), (1, 1)), ((2, 3, 1, 7), (4, 1)),
                                        ((1, 2, 5, 1), (1, 6)), ((2, 1, 3, 2), (5, 4))])
def test_tiny_and_odd_sizes(mode, padding_mode, align_corners, shape, size):
    x = torch.rand(*shape, dtype=torch.float64)
    theta = random_theta(shape[0], torch.float64)
    out = affine_sample(x, theta, size, mode, padding_mode, align_corners)
    ref = affine_sample_reference(x, theta, size, mode, padding_mode, align_corners)
    assert_matches_reference(out, ref, theta, x, size, mode, align_corners, 1e-10)


@needs_kernel
@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS)
def test_far_out_and_non_finite_coordinates(mode, padding_mode, align_corners):
    """Runaway coordinates sample padding; NaN or infinite ones give what torch gives
    (NaN where its weights turn NaN), and nothing crashes."""
    x = torch.rand(4, 2, 6, 7)
    theta = torch.stack([similarity(0.3, 1.0, 1e12 * torch.rand(()).item(), 0.0, torch.float32),
                         similarity(0.2, 1.0, float("inf"), 0.0, torch.float32),
                         torch.full((2, 3), float("nan")),
                         similarity(torch.rand(()).item(), 1e9, 0.0, 0.0, torch.float32)])
    out = affine_sample(x, theta, (5, 4), mode, padding_mode, align_corners)
    ref = affine_sample_reference(x, theta, (5, 4), mode, padding_mode, align_corners)
    if padding_mode == "reflection":
        # Folding a coordinate of ~1e9 pixels back into the image in float32 leaves only
        # rounding noise, which differs between any two implementations: check that the
        # result is still a blend of input pixels.
        lo, hi = x.min().item(), x.max().item()
        extra = 0.45 if mode == "bicubic" else 1e-6  # cubic weights overshoot by <= 0.445
        assert out[3].isfinite().all() and out[3].min() >= lo - extra and out[3].max() <= hi + extra
        out, ref = out[:3], ref[:3]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5, equal_nan=True)


@needs_kernel
def test_size_defaults_to_input_and_empty_batch():
    x = torch.rand(2, 3, 8, 5)
    theta = random_theta(2)
    assert affine_sample(x, theta).shape == (2, 3, 8, 5)
    empty = affine_sample(torch.rand(0, 3, 8, 5), torch.rand(0, 2, 3), (4, 4))
    assert empty.shape == (0, 3, 4, 4)
    assert affine_sample(torch.rand(2, 0, 8, 5), theta, (3, 2)).shape == (2, 0, 3, 2)


@needs_kernel
def test_wide_rotation_bands():
    """A 90 degree turn makes every output row read every input row."""
    x = torch.rand(2, 3, 40, 70)
    theta = torch.stack([similarity(math.pi / 2, 1.0, 0.1, 0.0, torch.float32),
                         similarity(-2.0, 0.8, 0.0, 0.2, torch.float32)])
    out = affine_sample(x, theta, (50, 33))
    torch.testing.assert_close(out, affine_sample_reference(x, theta, (50, 33)), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- layouts

@needs_kernel
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed", "expanded"])
def test_strided_inputs_match_contiguous(layout):
    base = torch.rand(2, 3, 18, 16)
    if layout == "channels_last":
        x = base.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = base[:, :, 1::2, ::2]
    elif layout == "transposed":
        x = base.transpose(2, 3)
    else:
        x = base[:1].expand(2, -1, -1, -1)
    theta_store = random_theta(2 * 2).view(2, 2, 2, 3)
    theta = theta_store[:, 1]  # non-contiguous theta too
    for mode, padding_mode in [("bilinear", "zeros"), ("nearest", "border"), ("bicubic", "reflection")]:
        out = affine_sample(x, theta, (9, 11), mode, padding_mode)
        assert torch.equal(out, affine_sample(x.contiguous(), theta.contiguous(), (9, 11), mode, padding_mode))
        ref = affine_sample_reference(x.contiguous(), theta.contiguous(), (9, 11), mode, padding_mode)
        assert_matches_reference(out, ref, theta, x, (9, 11), mode, False, 1e-5)


@needs_kernel
def test_strided_input_gradients_match_contiguous():
    x = torch.rand(2, 3, 10, 12, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    theta = random_theta(2, torch.float64).requires_grad_()
    g = torch.randn(2, 3, 7, 8, dtype=torch.float64).transpose(2, 3).contiguous().transpose(2, 3)
    grads = torch.autograd.grad(affine_sample(x, theta, (7, 8)), (x, theta), g)
    xc = x.detach().contiguous().requires_grad_()
    thc = theta.detach().clone().requires_grad_()
    ref = torch.autograd.grad(affine_sample_reference(xc, thc, (7, 8)), (xc, thc), g)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding_mode,align_corners", list(itertools.product(("zeros", "border"), (False, True))))
def test_bilinear_rows_split_at_the_image_edge(padding_mode, align_corners, dtype):
    """Bilinear rows run a fast loop where every tap is inside the image and the general one
    elsewhere: rows that cross the edge, rows wholly inside, and a theta whose large terms
    cancel (the interior bounds must allow for their rounding) all match torch."""
    thetas = [similarity(0.15, 1.0, 0.0, 0.0), similarity(-0.4, 1.1, 0.5, -0.2), similarity(0.0, 0.8, 0.0, 0.0),
              similarity(math.pi / 2, 1.0, 0.9, 0.0), torch.tensor([[3000.0, 0.0, -2999.5], [0.0, 1.0, 0.0]]),
              torch.tensor([[1e-7, 0.9, 0.0], [0.9, 1e-7, 0.01]])]
    theta = torch.stack(thetas).to(dtype).requires_grad_()
    x = torch.rand(len(thetas), 2, 37, 41, dtype=dtype, requires_grad=True)
    g = torch.randn(len(thetas), 2, 29, 45, dtype=dtype)
    out = affine_sample(x, theta, (29, 45), "bilinear", padding_mode, align_corners)
    ref = affine_sample_reference(x, theta, (29, 45), "bilinear", padding_mode, align_corners)
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL[dtype])
    grads = torch.autograd.grad(out, (x, theta), g)
    ref_grads = torch.autograd.grad(ref, (x, theta), g)
    rtol, atol = (1e-4, 1e-4) if dtype == torch.float32 else (1e-9, 1e-9)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * (1 + want.abs().max().item()))


# ----------------------------------------------------------------------------- gradients

def unambiguous_theta(n, dtype, x_shape, size, align_corners):
    """A random theta whose nearest-neighbour picks all are unambiguous (see decided())."""
    for _ in range(50):
        theta = random_theta(n, dtype)
        if decided(theta, x_shape, size, align_corners, margin=1e-4).all():
            return theta
    raise AssertionError("no unambiguous theta in 50 draws")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS)
def test_gradients_match_composition(mode, padding_mode, align_corners, dtype):
    x = torch.rand(2, 3, 8, 11, dtype=dtype, requires_grad=True)
    # Nearest: a pixel within rounding noise of a boundary could pick either source pixel
    # and send its whole gradient there, so such draws are redrawn.
    theta = (unambiguous_theta(2, dtype, x.shape, (9, 7), align_corners) if mode == "nearest"
             else random_theta(2, dtype)).requires_grad_()
    g = torch.randn(2, 3, 9, 7, dtype=dtype)
    out = affine_sample(x, theta, (9, 7), mode, padding_mode, align_corners)
    gx, gt = torch.autograd.grad(out, (x, theta), g)
    ref = affine_sample_reference(x, theta, (9, 7), mode, padding_mode, align_corners)
    rx, rt = torch.autograd.grad(ref, (x, theta), g)
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-9, 1e-11)
    torch.testing.assert_close(gx, rx, rtol=rtol, atol=atol)
    torch.testing.assert_close(gt, rt, rtol=rtol, atol=atol * 10)


@needs_kernel
@pytest.mark.parametrize("needs", ["x", "theta"])
def test_gradient_of_one_input_only(needs):
    x = torch.rand(3, 2, 7, 9, dtype=torch.float64, requires_grad=needs == "x")
    theta = random_theta(3, torch.float64).requires_grad_(needs == "theta")
    target = x if needs == "x" else theta
    (grad,) = torch.autograd.grad(affine_sample(x, theta, (6, 5)).square().sum(), target)
    (ref,) = torch.autograd.grad(affine_sample_reference(x, theta, (6, 5)).square().sum(), target)
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12)


@needs_kernel
@pytest.mark.parametrize("n,c", [(1, 9), (9, 37)])
def test_backward_is_deterministic_and_splits_channels_consistently(n, c):
    # The input gradient is split into channel blocks: for few images, and for many channels.
    x = torch.rand(n, c, 12, 10, requires_grad=True)
    theta = random_theta(n).requires_grad_()
    g = torch.randn(n, c, 11, 13)
    first = torch.autograd.grad(affine_sample(x, theta, (11, 13)), (x, theta), g)
    second = torch.autograd.grad(affine_sample(x, theta, (11, 13)), (x, theta), g)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    ref = torch.autograd.grad(affine_sample_reference(x, theta, (11, 13)), (x, theta), g)
    torch.testing.assert_close(first[0], ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first[1], ref[1], rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding_mode,align_corners", list(itertools.product(PADDINGS, (False, True))))
@pytest.mark.parametrize("shape,size", [((2, 40, 9, 12), (11, 7)), ((1, 70, 6, 5), (4, 8)),
                                        ((16, 24, 7, 9), (6, 10)), ((3, 20, 1, 7), (5, 6))])
def test_many_channels_match_composition(shape, size, padding_mode, align_corners, dtype):
    # Bilinear with >= 16 channels has its own kernels on channel-interleaved copies: one
    # block per image with many images (16, 24), several blocks of an image with few images
    # (1, 70; 2, 40 with more than one thread); sizes that are not multiples of 8 reach the
    # edges of its transposes. A 1-pixel axis stays planar. channels_last input is read in
    # place (no copy) by the forward, and by the backward with one block per image or for
    # theta's gradient alone; sliced channels run planar.
    x = torch.rand(*shape, dtype=dtype)
    theta = random_theta(shape[0], dtype)
    out = affine_sample(x, theta, size, "bilinear", padding_mode, align_corners)
    ref = affine_sample_reference(x, theta, size, "bilinear", padding_mode, align_corners)
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL[dtype])
    for strided in (x.to(memory_format=torch.channels_last), x.repeat_interleave(2, dim=1)[:, ::2]):
        torch.testing.assert_close(affine_sample(strided, theta, size, "bilinear", padding_mode, align_corners),
                                   out, rtol=0, atol=TOL[dtype])
    g = torch.randn(shape[0], shape[1], *size, dtype=dtype)
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-9, 1e-11)
    for wrt, memory_format in itertools.product(("both", "x", "theta"),
                                                (torch.contiguous_format, torch.channels_last)):
        xs = x.clone(memory_format=memory_format).requires_grad_(wrt != "theta")
        ts = theta.clone().requires_grad_(wrt != "x")
        xr = x.clone().requires_grad_(wrt != "theta")
        tr = theta.clone().requires_grad_(wrt != "x")
        ours = torch.autograd.grad(affine_sample(xs, ts, size, "bilinear", padding_mode, align_corners),
                                   [t for t in (xs, ts) if t.requires_grad], g)
        ref = torch.autograd.grad(affine_sample_reference(xr, tr, size, "bilinear", padding_mode,
                                                          align_corners),
                                  [t for t in (xr, tr) if t.requires_grad], g)
        for a, b, is_theta in zip(ours, ref, [False, True] if wrt == "both" else [wrt == "theta"], strict=True):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol * (10 if is_theta else 1))


@needs_kernel
@pytest.mark.parametrize("mode,padding_mode,align_corners",
                         [c for c in COMBOS if c[0] != "nearest"] + [("nearest", "zeros", False)])
def test_gradcheck(mode, padding_mode, align_corners):
    x = torch.rand(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    theta = theta_off_kinks(2, (5, 6), (4, 5), align_corners).requires_grad_(mode != "nearest")
    assert torch.autograd.gradcheck(
        lambda a, t: affine_sample(a, t, (4, 5), mode, padding_mode, align_corners), (x, theta))


@needs_kernel
def test_double_backward_raises():
    x = torch.rand(1, 2, 5, 5, dtype=torch.float64)
    theta = random_theta(1, torch.float64).requires_grad_()
    (g,) = torch.autograd.grad(affine_sample(x, theta).sum(), theta, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@needs_kernel
def test_opcheck():
    x = torch.rand(2, 3, 6, 7, requires_grad=True)
    theta = random_theta(2).requires_grad_()
    torch.library.opcheck(torch.ops.stnpadim.affine_sample.default,
                          (x, theta, 5, 4, MODES.index("bicubic"), PADDINGS.index("reflection"), False))
    g = torch.randn(2, 3, 5, 4)
    torch.library.opcheck(torch.ops.stnpadim._affine_sample_backward.default,
                          (g, x.detach(), theta.detach(), 6, 7, 0, 0, True, True, True))
    torch.library.opcheck(torch.ops.stnpadim._affine_sample_backward.default,
                          (g, None, theta.detach(), 6, 7, 1, 1, False, True, False))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("x,theta,kwargs,match", [
    (torch.rand(3, 8, 8), torch.rand(3, 2, 3), {}, "4-D"),
    (torch.rand(2, 3, 8, 8), torch.rand(2, 3, 3), {}, r"\[N, 2, 3\]"),
    (torch.rand(2, 3, 8, 8), torch.rand(2, 6), {}, r"\[N, 2, 3\]"),
    (torch.rand(2, 3, 8, 8), torch.rand(3, 2, 3), {}, "3 matrices but x has 2 images"),
    (torch.rand(2, 3, 8, 8), torch.rand(2, 2, 3, dtype=torch.float64), {}, "dtype"),
    (torch.randint(0, 5, (2, 3, 8, 8)), torch.rand(2, 2, 3), {}, "floating-point"),
    (torch.rand(2, 3, 0, 8), torch.rand(2, 2, 3), {}, "non-empty"),
    (torch.rand(2, 3, 8, 8), torch.rand(2, 2, 3), {"size": (0, 4)}, "positive"),
    (torch.rand(2, 3, 8, 8), torch.rand(2, 2, 3), {"size": (4, -1)}, "positive"),
    (torch.rand(2, 3, 8, 8), torch.rand(2, 2, 3), {"size": 5}, "pair"),
    (torch.rand(2, 3, 8, 8), torch.rand(2, 2, 3), {"size": (4.0, 4)}, "ints"),
    (torch.rand(2, 3, 8, 8), torch.rand(2, 2, 3), {"mode": "linear"}, "unknown mode 'linear'"),
    (torch.rand(2, 3, 8, 8), torch.rand(2, 2, 3), {"padding_mode": "wrap"}, "unknown padding_mode"),
    ([[1.0]], torch.rand(1, 2, 3), {}, "4-D tensor"),
])
def test_bad_inputs_raise_clear_errors(x, theta, kwargs, match):
    with pytest.raises(InputError, match=match):
        affine_sample(x, theta, **kwargs)
    assert issubclass(InputError, ValueError)


@needs_cuda
def test_device_mismatch_raises():
    with pytest.raises(InputError, match="theta is on"):
        affine_sample(torch.rand(1, 1, 4, 4), torch.rand(1, 2, 3, device="cuda"))


@needs_kernel
@pytest.mark.parametrize("args,match", [
    ((torch.rand(2, 3, 8), torch.rand(2, 2, 3), 4, 4, 0, 0, False), "input must be a 4-D tensor"),
    ((torch.rand(2, 3, 8, 8), torch.rand(2, 3, 2), 4, 4, 0, 0, False), r"theta must have shape \[N, 2, 3\]"),
    ((torch.rand(2, 3, 8, 8), torch.rand(1, 2, 3), 4, 4, 0, 0, False), "1 matrices but the batch has 2"),
    ((torch.rand(2, 3, 8, 8), torch.rand(2, 2, 3).double(), 4, 4, 0, 0, False), "dtype"),
    ((torch.rand(2, 3, 8, 8), torch.rand(2, 2, 3), 0, 4, 0, 0, False), "output size must be positive"),
    ((torch.rand(2, 3, 8, 8), torch.rand(2, 2, 3), 4, 4, 7, 0, False), "interpolation must be"),
    ((torch.rand(2, 3, 8, 8), torch.rand(2, 2, 3), 4, 4, 0, 3, False), "padding must be"),
    ((torch.ones(2, 3, 8, 8, dtype=torch.int32), torch.ones(2, 2, 3, dtype=torch.int32), 4, 4, 0, 0, False),
     "dtype Int is not supported on cpu"),
])
def test_op_checks_name_the_argument(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.stnpadim.affine_sample(*args)


# ----------------------------------------------------------------------------- API

@needs_kernel
def test_public_api_and_module():
    x = torch.rand(2, 3, 10, 10)
    theta = random_theta(2)
    assert sp.affine_sample is affine_sample
    module = AffineSample(size=(6, 7), mode="bicubic", padding_mode="border", align_corners=True)
    assert torch.equal(module(x, theta), affine_sample(x, theta, (6, 7), "bicubic", "border", True))
    assert "bicubic" in repr(module)
    with pytest.raises(InputError, match="unknown mode"):
        AffineSample(mode="area")


def test_reference_path_without_extension():
    """STNPADIM_NO_EXT=1: no extension is loaded, the reference answers, checks still apply."""
    code = (
        "import torch, stnpadim_ext as sp\n"
        "from stnpadim_ext.ops.affine_sample import affine_sample_reference\n"
        "from stnpadim_ext.errors import InputError\n"
        "assert not sp.backend_info()['extension']\n"
        "x = torch.rand(2, 3, 7, 9, requires_grad=True)\n"
        "t = (torch.eye(2, 3) + 0.3 * torch.randn(2, 2, 3)).requires_grad_()\n"
        "y = sp.affine_sample(x, t, (5, 6), 'bicubic', 'reflection', True)\n"
        "assert torch.equal(y, affine_sample_reference(x, t, (5, 6), 'bicubic', 'reflection', True))\n"
        "y.sum().backward()\n"
        "assert x.grad is not None and t.grad is not None\n"
        "try:\n"
        "    sp.affine_sample(x, t[:1])\n"
        "except InputError as e:\n"
        "    assert 'matrices' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, STNPADIM_NO_EXT="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# ----------------------------------------------------------------------------- low precision
# float16 / bfloat16 are computed in float32 and rounded once, on every device (the contract
# in affine_sample's docstring). torch's CPU sampler is never used for them: in torch 2.14
# it computes tap offsets in 16 bits for these dtypes, which wrap once (H - 1) * sH +
# (W - 1) * sW reaches 2^15 (channels_last: C times sooner): wrong values, out-of-bounds
# reads and writes, SIGSEGV at 1 x 1 x 64 x 16384.

LOW_PRECISION = [torch.float16, torch.bfloat16]
# Tests that run on the CPU now and on CUDA where a GPU and the CUDA kernels are present.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda_kernel])]


def check_against_truth(x, theta, size, mode, padding_mode, align_corners, g=None):
    """Forward (and, with g, backward) of affine_sample vs the float64 composition on the
    same (rounded) inputs, within the bounds derived in tests/tolerances.py. Nearest: only
    output pixels whose pick rounding cannot change are compared (g is zeroed elsewhere)."""
    xg = x.detach().requires_grad_(g is not None)
    tg = theta.detach().requires_grad_(g is not None)
    out = affine_sample(xg, tg, size, mode, padding_mode, align_corners)
    want = tolerances.truth(x, theta, size, mode, padding_mode, align_corners)
    assert out.dtype == x.dtype and out.isfinite().all()
    keep = torch.ones_like(want, dtype=torch.bool)
    if mode == "nearest":
        margin = max(1e-4, 2 * tolerances.coordinate_error(theta, x.shape, x.dtype))
        keep = decided(theta.double(), x.shape, size, align_corners, margin).expand_as(want)
        assert keep.float().mean() >= 0.5
    rtol, atol = tolerances.forward_tolerance(x, theta, mode)
    torch.testing.assert_close(out.double()[keep], want[keep], rtol=rtol, atol=atol)
    if g is None:
        return out, None
    g = torch.where(keep, g.double(), 0).to(g.dtype)
    gx, gt = torch.autograd.grad(out, (xg, tg), g)
    wx, wt = tolerances.truth_grads(x, theta, g, size, mode, padding_mode, align_corners)
    assert gx.dtype == x.dtype and gt.dtype == theta.dtype
    rtol, atol = tolerances.grad_x_tolerance(x, theta, g, size, mode, padding_mode, align_corners)
    torch.testing.assert_close(gx.double(), wx, rtol=rtol, atol=atol)
    rtol, atol = tolerances.grad_theta_tolerance(x, theta, g, size, mode)
    torch.testing.assert_close(gt.double(), wt, rtol=rtol, atol=atol)
    return out, (gx, gt)


@needs_kernel
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS)
def test_cpu_low_precision_is_float32_rounded_once(mode, padding_mode, align_corners, dtype):
    x = torch.rand(2, 3, 9, 12).to(dtype)
    theta = random_theta(2).to(dtype)
    g = torch.randn(2, 3, 7, 13).to(dtype)
    check_against_truth(x, theta, (7, 13), mode, padding_mode, align_corners, g)
    # Bit for bit: the float32 op on the upcast inputs, rounded to the dtype.
    xl, tl = x.clone().requires_grad_(), theta.clone().requires_grad_()
    xf, tf = x.float().requires_grad_(), theta.float().requires_grad_()
    out = affine_sample(xl, tl, (7, 13), mode, padding_mode, align_corners)
    out32 = affine_sample(xf, tf, (7, 13), mode, padding_mode, align_corners)
    assert torch.equal(out, out32.to(dtype))
    grads = torch.autograd.grad(out, (xl, tl), g)
    for a, b in zip(grads, torch.autograd.grad(out32, (xf, tf), g.float()), strict=True):
        assert torch.equal(a, b.to(dtype))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_channels_last_offsets_past_2_15(device, dtype, mode):
    x = torch.rand(2, 5, 70, 131).to(device, dtype).to(memory_format=torch.channels_last)
    assert (x.shape[2] - 1) * x.stride(2) + (x.shape[3] - 1) * x.stride(3) >= 2**15
    theta = random_theta(2).to(device, dtype)
    g = torch.randn(2, 5, 61, 97).to(device, dtype)
    check_against_truth(x, theta, (61, 97), mode, "zeros", False, g)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_reads_and_writes_only_the_tensor(device, dtype):
    """A 1 x 1 x 3 x 16384 plane behind 2^15 elements holding 1000: torch 2.14's CPU half
    sampler returned that value (its offsets wrap) and its input gradient summed to 0."""
    storage = torch.full((2**15 + 3 * 16384,), 1000.0, dtype=dtype, device=device)
    x = storage[2**15:].view(1, 1, 3, 16384)
    x.copy_(torch.rand(1, 1, 3, 16384))
    theta = torch.tensor([[[1.0, 0.0, 2**-15], [0.0, 1.0, 0.3]]], dtype=dtype, device=device)  # (0.25, 0.45) px
    out, _ = check_against_truth(x, theta, (3, 16384), "bilinear", "zeros", False)
    assert out.max() <= 1
    # One output pixel's gradient: its four taps are inside, their weights sum to 1.
    xg = x.detach().clone().requires_grad_()
    g = torch.zeros(1, 1, 3, 16384, dtype=dtype, device=device)
    g[0, 0, 1, 20000 % 16384] = 1
    (gx,) = torch.autograd.grad(affine_sample(xg, theta), xg, g)
    assert (gx != 0).sum() == 4 and gx.min() >= 0
    assert abs(gx.double().sum().item() - 1) <= 4 * tolerances.unit_roundoff(dtype)
    assert torch.equal(storage[: 2**15], torch.full((2**15,), 1000.0, dtype=dtype, device=device))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_wide_plane_forward_and_backward(device, dtype):
    """1 x 1 x 64 x 16384: torch 2.14's CPU half sampler died with SIGSEGV here."""
    x = torch.rand(1, 1, 64, 16384).to(device, dtype)
    theta = (torch.eye(2, 3) + 0.02 * torch.randn(1, 2, 3)).to(device, dtype)
    g = (torch.rand(1, 1, 64, 16384) * 2**-10).to(device, dtype)  # small: theta's gradient stays finite in float16
    _, (gx, gt) = check_against_truth(x, theta, (64, 16384), "bilinear", "zeros", False, g)
    # Sums of the input gradient: every output's weights land in grad_input (none lost).
    wx, _ = tolerances.truth_grads(x, theta, g, (64, 16384), "bilinear", "zeros", False)
    torch.testing.assert_close(gx.double().sum(), wx.sum(), rtol=2 * tolerances.unit_roundoff(dtype), atol=0)


def test_reference_never_runs_torch_low_precision_sampler(monkeypatch):
    calls = []
    real = F.grid_sample

    def spy(x, *args, **kwargs):
        calls.append(x.dtype)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(F, "grid_sample", spy)
    for dtype in LOW_PRECISION:
        x = torch.rand(2, 3, 6, 6).to(dtype)
        theta = random_theta(2).to(dtype)
        out = affine_sample_reference(x, theta)
        assert out.dtype == dtype
        assert torch.equal(out, affine_sample_reference(x.float(), theta.float()).to(dtype))
        affine_sample(x, theta)
    assert calls and not set(calls) & set(LOW_PRECISION), calls


# ----------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS)
def test_cuda_matches_composition(mode, padding_mode, align_corners, dtype):
    x = torch.rand(3, 4, 13, 17, dtype=dtype, device="cuda", requires_grad=True)
    theta = random_theta(3, dtype, "cuda").requires_grad_()
    g = torch.randn(3, 4, 11, 9, dtype=dtype, device="cuda")
    out = affine_sample(x, theta, (11, 9), mode, padding_mode, align_corners)
    ref = affine_sample_reference(x, theta, (11, 9), mode, padding_mode, align_corners)
    assert_matches_reference(out.detach(), ref.detach(), theta.detach(), x, (11, 9), mode, align_corners,
                             TOL[dtype] * 10)
    if mode == "nearest" and not decided(theta.detach(), x.shape, (11, 9), align_corners).all():
        return  # an ambiguous nearest pick moves a whole gradient entry: values checked above
    grads = torch.autograd.grad(out, (x, theta), g)
    refs = torch.autograd.grad(ref, (x, theta), g)
    rtol, atol = (1e-4, 1e-4) if dtype == torch.float32 else (1e-9, 1e-10)
    for a, b in zip(grads, refs, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.cuda
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS)
def test_cuda_low_precision_contract(dtype, mode, padding_mode, align_corners):
    """Half types on CUDA: float32 coordinates and sums, one rounding (as on the CPU)."""
    x = torch.rand(2, 3, 16, 24, device="cuda").to(dtype).to(memory_format=torch.channels_last)
    theta = random_theta(2, device="cuda").to(dtype)
    g = torch.randn(2, 3, 12, 20, device="cuda").to(dtype)
    check_against_truth(x, theta, (12, 20), mode, padding_mode, align_corners, g)
    # The float32 kernel on the upcast inputs, rounded: equal up to one unit in the last
    # place (the half and float instances may contract multiply-adds differently).
    xl, tl = x.clone().requires_grad_(), theta.clone().requires_grad_()
    xf, tf = x.float().requires_grad_(), theta.float().requires_grad_()
    out = affine_sample(xl, tl, (12, 20), mode, padding_mode, align_corners)
    out32 = affine_sample(xf, tf, (12, 20), mode, padding_mode, align_corners)
    ulp = torch.finfo(dtype).eps
    keep = (decided(theta.double(), x.shape, (12, 20), align_corners).expand_as(out) if mode == "nearest"
            else torch.ones_like(out, dtype=torch.bool))
    torch.testing.assert_close(out.float()[keep], out32.to(dtype).float()[keep], rtol=ulp, atol=1e-7)
    if mode != "nearest":
        gx, _ = torch.autograd.grad(out, (xl, tl), g)
        gx32, _ = torch.autograd.grad(out32, (xf, tf), g.float())
        # Atomic float32 sums in either order, then one rounding.
        torch.testing.assert_close(gx.float(), gx32.to(dtype).float(), rtol=ulp, atol=1e-6)


@pytest.mark.cuda
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_cuda_low_precision_beats_dtype_coordinates(dtype):
    """Why float32 coordinates: torch's composition rounds affine_grid's coordinates to
    the dtype (a shift of up to u (G + 1) size / 2 pixels: 2.5 px for bfloat16 at 640 px);
    ours stays within one rounding of the float32 truth."""
    x = torch.rand(1, 3, 480, 640, device="cuda").to(dtype)
    theta = torch.tensor([[[0.93, -0.21, 0.07], [0.23, 0.95, -0.05]]], device="cuda").to(dtype)
    want = tolerances.truth(x, theta, (480, 640), "bilinear", "zeros", False)
    ours = (affine_sample(x, theta).double() - want).abs().max().item()
    grid = F.affine_grid(theta, (1, 3, 480, 640), align_corners=False)
    theirs = (F.grid_sample(x, grid, align_corners=False).double() - want).abs().max().item()
    rtol, atol = tolerances.forward_tolerance(x, theta, "bilinear")
    assert ours <= atol + rtol * want.abs().max().item()
    assert ours <= theirs


@pytest.mark.cuda
@needs_cuda_kernel
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_cuda_non_default_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on the tensors' device."""
    x = torch.rand(2, 3, 17, 23, device="cuda:1", requires_grad=True)
    theta = random_theta(2, device="cuda:1").requires_grad_()
    g = torch.randn(2, 3, 11, 13, device="cuda:1")
    assert torch.cuda.current_device() == 0
    out = affine_sample(x, theta, (11, 13), "bicubic", "reflection")
    assert out.device == x.device
    check_against_truth(x.detach(), theta.detach(), (11, 13), "bicubic", "reflection", False, g)
    torch.testing.assert_close(out.cpu(), affine_sample(x.detach().cpu(), theta.detach().cpu(), (11, 13),
                                                        "bicubic", "reflection"), rtol=0, atol=1e-5)


@pytest.mark.cuda
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_input_over_2_31_elements(dtype):
    """3 x 27000 x 27000 = 2.19e9 elements: the last channel's lower rows lie past 2^31, and
    the window sampled is there. Forward and gradients vs the reference (torch's float32
    composition, 64-bit indexing) on the same tensor."""
    need = 3 * 27000 * 27000 * (4 * 3 + 2 * torch.finfo(dtype).bits // 8)
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    x = torch.empty(1, 3, 27000, 27000, device="cuda", dtype=dtype)
    x[:, :, 25000:].uniform_()
    x[:, :, :25000].fill_(5.0)  # any read of the wrong rows shows
    assert x.numel() > 2**31 and 2 * x.stride(1) + 25900 * x.stride(2) > 2**31
    theta = torch.tensor([[[0.03, 0.01, 0.93], [-0.01, 0.03, 0.94]]], device="cuda", dtype=dtype)
    xg, tg = x.requires_grad_(), theta.clone().requires_grad_()
    out = affine_sample(xg, tg, (64, 64))
    assert out.max() <= 1
    ref = affine_sample_reference(x.detach(), theta, (64, 64))
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * tolerances.unit_roundoff(dtype), atol=1e-4)
    g = torch.rand(1, 3, 64, 64, device="cuda", dtype=dtype)
    gx, gt = torch.autograd.grad(out, (xg, tg), g)
    assert gx[:, :, :25000].count_nonzero() == 0
    xr, tr = x.detach().float().requires_grad_(), theta.float().requires_grad_()
    rx, rt = torch.autograd.grad(affine_sample_reference(xr, tr, (64, 64)), (xr, tr), g.float())
    torch.testing.assert_close(gx[:, :, 25000:].float(), rx[:, :, 25000:], rtol=2 * tolerances.unit_roundoff(dtype),
                               atol=1e-4)
    torch.testing.assert_close(gt.float(), rt, rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@needs_cuda_kernel
def test_cuda_strided_and_gradcheck():
    base = torch.rand(2, 3, 12, 10, device="cuda", dtype=torch.float64)
    theta = random_theta(2, torch.float64, "cuda")
    x = base.to(memory_format=torch.channels_last)
    assert torch.equal(affine_sample(x, theta, (7, 9)), affine_sample(base, theta, (7, 9)))
    xs = torch.rand(1, 2, 5, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    ts = theta_off_kinks(1, (5, 6), (4, 5), device="cuda").requires_grad_()
    assert torch.autograd.gradcheck(lambda a, t: affine_sample(a, t, (4, 5), "bilinear", "border"), (xs, ts))
    torch.library.opcheck(torch.ops.stnpadim.affine_sample.default, (xs, ts, 4, 5, 0, 0, False))


# ----------------------------------------------------------------------------- per device
# These run on the CPU now and on CUDA where a GPU and the CUDA kernels are present: each
# backend must match torch on its own device.



@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding_mode,align_corners", list(itertools.product(PADDINGS, (False, True))))
def test_nearest_2x_downsampling_is_exact(device, dtype, padding_mode, align_corners):
    """2x downsampling puts most sampling points exactly on half-pixels, where nearest
    rounding is decided by the last bit of the coordinate: it must be torch's, bit for bit."""
    x = torch.rand(2, 3, 64, 56, dtype=dtype, device=device)
    theta = torch.eye(2, 3, dtype=dtype, device=device).expand(2, 2, 3)
    out = affine_sample(x, theta, (32, 28), "nearest", padding_mode, align_corners)
    ref = affine_sample_reference(x, theta, (32, 28), "nearest", padding_mode, align_corners)
    if not align_corners:  # the test must be about ties: most points sit on one
        assert (~decided(theta, x.shape, (32, 28), False, margin=1e-9)).float().mean() > 0.5
    assert torch.equal(out, ref)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_nearest_ties_under_a_quarter_turn_are_torchs(device, dtype, padding_mode):
    """A quarter turn with 2x downsampling: every sampling point is a half-pixel tie in both
    axes, and theta's entries (0, +-1) make the coordinates exact in any summation order,
    so the picks must be torch's (float32 composition for the half types), bit for bit."""
    x = torch.rand(2, 3, 48, 40).to(device, dtype)
    theta = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]).expand(2, 2, 3).to(device, dtype)
    out = affine_sample(x, theta, (20, 24), "nearest", padding_mode, False)
    ref = affine_sample_reference(x, theta, (20, 24), "nearest", padding_mode, False)
    assert (~decided(theta, x.shape, (20, 24), False, margin=1e-9)).all()
    assert torch.equal(out, ref)


def _non_finite_theta(dtype, device):
    return torch.stack([similarity(0.2, 1.0, float("inf"), 0.0, dtype),
                        torch.full((2, 3), float("nan"), dtype=dtype),
                        similarity(0.3, 1.0, -float("inf"), 0.0, dtype)]).to(device)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS)
def test_non_finite_coordinates_follow_torch_on_the_device(device, mode, padding_mode, align_corners):
    """torch-CPU turns a pixel with a NaN/Inf sampling point NaN; torch-CUDA moves the point
    outside the image (zero padding: 0) for bilinear and nearest. Each backend follows its own."""
    x = torch.rand(3, 2, 6, 7, device=device)
    theta = _non_finite_theta(torch.float32, device)
    out = affine_sample(x, theta, (5, 4), mode, padding_mode, align_corners)
    ref = affine_sample_reference(x, theta, (5, 4), mode, padding_mode, align_corners)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5, equal_nan=True)
    if mode == "bilinear" and padding_mode == "zeros":
        assert out.isnan().all() if device == "cpu" else (out == 0).all()


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,padding_mode,align_corners", COMBOS)
def test_inf_pixels_and_nan_gradients_propagate(device, mode, padding_mode, align_corners):
    """An Inf pixel read under a zero weight (sampling exactly on pixel centres) is NaN in
    torch, and a NaN in grad_output reaches every input pixel torch sends it to. The CUDA
    kernel reads exactly torch's in-bounds taps, so it must match torch's NaN/Inf pattern;
    the CPU kernel reads a 2x2 block that always lies inside and may add NaNs where torch
    has none (documented), but must never lose one."""
    x = torch.rand(2, 2, 8, 9, dtype=torch.float64, device=device)
    x[:, 0, :, 3] = float("inf")
    # Integer pixel shifts: sampling points on pixel centres, so one tap of each pair has weight 0.
    theta = torch.tensor([[[1.0, 0.0, 2 / 9], [0.0, 1.0, 0.0]], [[1.0, 0.0, 0.0], [0.0, 1.0, -2 / 8]]],
                         dtype=torch.float64, device=device)
    out = affine_sample(x, theta, (8, 9), mode, padding_mode, align_corners)
    ref = affine_sample_reference(x, theta, (8, 9), mode, padding_mode, align_corners)
    g = torch.randn_like(out)
    g[:, 1, 2:4] = float("nan")
    xg = x.nan_to_num(posinf=0.5).requires_grad_()
    grad = torch.autograd.grad(affine_sample(xg, theta, (8, 9), mode, padding_mode, align_corners), xg, g)[0]
    grad_ref = torch.autograd.grad(affine_sample_reference(xg, theta, (8, 9), mode, padding_mode,
                                                           align_corners), xg, g)[0]
    assert (~ref.isfinite()).any() and grad_ref.isnan().any()  # the case is the one under test
    if device == "cuda":
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10, equal_nan=True)
        torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-10, equal_nan=True)
    else:
        assert (out.isnan() | ~ref.isnan()).all() and (~out.isfinite() | ref.isfinite()).all()
        assert (grad.isnan() | ~grad_ref.isnan()).all()
        finite = ref.isfinite() & out.isfinite()
        torch.testing.assert_close(out[finite], ref[finite], rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- CUDA only

@pytest.mark.cuda
@needs_cuda_kernel
@pytest.mark.parametrize("mode", MODES)
def test_cuda_channel_split_on_small_maps(mode):
    """One small map with many channels: grid.z splits the channels; every one is done."""
    x = torch.rand(1, 203, 11, 13, device="cuda", dtype=torch.float64)
    theta = random_theta(1, torch.float64, "cuda")
    out = affine_sample(x, theta, (7, 9), mode)
    ref = affine_sample(x.cpu(), theta.cpu(), (7, 9), mode)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-12)


@pytest.mark.cuda
@needs_cuda_kernel
def test_cuda_non_default_stream():
    x = torch.rand(4, 3, 32, 32, device="cuda", requires_grad=True)
    theta = random_theta(4, device="cuda").requires_grad_()
    want = affine_sample(x, theta, (24, 24))
    want_grads = torch.autograd.grad(want.sum(), (x, theta))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = affine_sample(x, theta, (24, 24))
        grads = torch.autograd.grad(got.sum(), (x, theta))
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@needs_cuda_kernel
def test_cuda_deterministic_mode_refuses_the_atomic_backward():
    x = torch.rand(1, 1, 8, 8, device="cuda", requires_grad=True)
    theta = random_theta(1, device="cuda")
    out = affine_sample(x, theta)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="affine_sample_backward_cuda"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
