"""Error bounds for the ops against float64 truths, derived from the rounding they do.

Each bound is a sum of the error sources of the computation at the size tested, so it holds
on any CPU (FMA or not, AVX2 or AVX-512 summation orders) without being loose enough to hide
a wrong tap or a wrong weight:

* compute rounding u: the unit roundoff of the dtype the kernel computes in (float32 for
  float16/bfloat16/float32, float64 for float64);
* coordinate error: affine_sample's sampling point is theta @ (bx, by, 1), unnormalised to
  pixels (x (size / 2)); each step rounds, so a point moves by e_px = 16 u size (G + 1)
  pixels at most, G the largest row sum |theta_i0| + |theta_i1| + |theta_i2|, and a value
  moves by e_px times the interpolant's slope (<= 2 x the input's range for bilinear, 6 x
  for bicubic);
* output rounding: float16/bfloat16 results are float32 results rounded once (half a unit
  in the last place, plus the spacing of float16 subnormals near zero).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOW_PRECISION = (torch.float16, torch.bfloat16)
# Slope of the interpolant per unit of range, summed over both axes.
SLOPE = {"bilinear": 2.0, "bicubic": 6.0, "nearest": 0.0}
# Sum of |weights| of one output pixel's taps (cubic convolution overshoots).
WEIGHT_SUM = {"bilinear": 1.0, "bicubic": 1.6, "nearest": 1.0}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def output_rounding(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) of rounding a float32 result once to dtype (0 for float32/float64)."""
    if dtype not in LOW_PRECISION:
        return 0.0, 0.0
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # subnormal spacing
    return unit_roundoff(dtype), tiny


def theta_size(theta: torch.Tensor) -> float:
    """G: the largest row sum of |theta| over the batch (1 for the identity)."""
    if theta.numel() == 0:
        return 1.0
    return theta.double().abs().sum(-1).max().item()


def coordinate_error(theta: torch.Tensor, in_shape, dtype: torch.dtype) -> float:
    """e_px: how far, in input pixels, a sampling point may be from the float64 one."""
    size = max(in_shape[-2], in_shape[-1])
    return 16 * unit_roundoff(compute_dtype(dtype)) * size * (theta_size(theta) + 1)


def value_range(x: torch.Tensor) -> float:
    """max |x| (0 for an empty tensor): bounds every difference between two pixels / 2."""
    return x.double().abs().max().item() if x.numel() else 0.0


def forward_tolerance(x: torch.Tensor, theta: torch.Tensor, mode: str) -> tuple[float, float]:
    """(rtol, atol) of affine_sample(x, theta) against the float64 composition on x, theta
    as given (already rounded to their dtype)."""
    u = unit_roundoff(compute_dtype(x.dtype))
    scale = value_range(x)
    e_px = coordinate_error(theta, x.shape, x.dtype)
    atol = (SLOPE[mode] * e_px * 2 + 32 * u * WEIGHT_SUM[mode]) * scale
    rtol, tiny = output_rounding(x.dtype)
    return rtol, atol * (1 + rtol) + tiny


def decided(theta, x_shape, size, align_corners, margin=1e-3):
    """Output pixels whose nearest-neighbour pick is unambiguous: their sampling point is
    not within `margin` pixel of a rounding boundary (half-integers, before padding; border
    and reflection map half-integers to half-integers). Rounding noise decides the others."""
    grid = F.affine_grid(theta.double(), (theta.shape[0], 1, *size), align_corners=align_corners)
    mask = torch.ones(grid.shape[:3], dtype=torch.bool, device=theta.device)
    for axis, n in ((0, x_shape[-1]), (1, x_shape[-2])):
        g = grid[..., axis]
        pix = (g + 1) / 2 * (n - 1) if align_corners else ((g + 1) * n - 1) / 2
        frac = pix - pix.floor()
        mask &= (frac - 0.5).abs() > margin
    return mask[:, None]


def truth(x, theta, size, mode, padding_mode, align_corners):
    """The float64 composition (torch's affine_grid + grid_sample) on x and theta as given."""
    xd = x.detach().double()
    grid = F.affine_grid(theta.detach().double(), (x.shape[0], x.shape[1], *size), align_corners=align_corners)
    return F.grid_sample(xd, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def truth_grads(x, theta, g, size, mode, padding_mode, align_corners):
    """Float64 gradients of the composition w.r.t. x and theta for output gradient g."""
    xd = x.detach().double().requires_grad_()
    td = theta.detach().double().requires_grad_()
    out = F.grid_sample(xd, F.affine_grid(td, (x.shape[0], x.shape[1], *size), align_corners=align_corners),
                        mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    return torch.autograd.grad(out, (xd, td), g.double())


def grad_x_tolerance(x, theta, g, size, mode, padding_mode, align_corners) -> tuple[float, float]:
    """(rtol, atol) of d loss / d x. Each input pixel receives sum_k w_k g_k; bilinear and
    nearest weights are >= 0, so M = max over pixels of sum_k w_k |g_k| is the float64
    gradient for |g| (bicubic's taps spread over 4x4 pixels with sum |w| <= 1.6: 2 M bounds
    it). Weights move by e_px (slope <= 1 per axis), the sums round by u per term."""
    u = unit_roundoff(compute_dtype(x.dtype))
    bil = "bilinear" if mode == "bicubic" else mode
    m = truth_grads(x, theta, g.abs(), size, bil, padding_mode, align_corners)[0].abs().max().item()
    m *= 2.0 if mode == "bicubic" else 1.0
    e_px = coordinate_error(theta, x.shape, x.dtype)
    rtol, tiny = output_rounding(x.dtype)
    return rtol, (4 * e_px * 3 + 64 * u) * m * (1 + rtol) + tiny


def grad_theta_tolerance(x, theta, g, size, mode) -> tuple[float, float]:
    """atol of d loss / d theta, per entry. Terms: g * dv/dx * (size / 2) * base coordinate,
    |dv/dx| <= SLOPE x range, summed over C x Ho x Wo outputs in the compute dtype (the
    kernels sum rows of Wo in it, then rows in float64). Bilinear's dv/dx jumps (by <= 2 x
    range) where a point crosses a pixel boundary: rounding moves about 4 e px x Ho x Wo
    points across one; that many jumps (x 3, + 6) are allowed too."""
    rtol, _ = output_rounding(x.dtype)
    if mode == "nearest":
        return 0.0, 0.0
    u = unit_roundoff(compute_dtype(x.dtype))
    size_in = max(x.shape[-2], x.shape[-1])
    rng = 2 * value_range(x)
    per_term = g.double().abs().amax(dim=(1, 2, 3)).max().item() * SLOPE[mode] * rng * size_in / 2
    n_out = size[0] * size[1]
    terms = x.shape[1] * n_out
    sum_abs = per_term * terms
    e_true = coordinate_error(theta, x.shape, x.dtype) / 8  # the bound's margin off
    jumps = 3 * 4 * e_true * n_out + 6
    jump_size = x.shape[1] * g.double().abs().max().item() * 2 * rng * size_in / 2
    return rtol, ((size[1] + 16) * u * sum_abs + jumps * jump_size) * (1 + rtol)


def mahalanobis_tolerance(emb: torch.Tensor, gaussian, want: torch.Tensor) -> tuple[float, float]:
    """(rtol, atol) of the distances against float64 ones on emb as given. The squared
    distance is sum_i y_i^2, y = L d, d = emb - mean, in the compute dtype: each y_i is off
    by <= (C + 2) u t_i with t = |L| |d| (the sum of its terms' magnitudes, d's own rounding
    included), so the sum by <= (C + 2) u (2 sum_i |y_i| t_i + sum_i y_i^2); the square root
    turns that into the absolute error below."""
    u = unit_roundoff(compute_dtype(emb.dtype))
    dim = emb.shape[1]
    factor = gaussian.factor().double()                                   # [P, C, C]
    d = (emb.double().flatten(2) - gaussian.mean.double().T[None]).permute(2, 1, 0)  # [P, C, B]
    y, t = factor @ d, factor.abs() @ (d.abs() + emb.double().flatten(2).abs().permute(2, 1, 0))
    err_sq = ((dim + 2) * u * (2 * (y.abs() * t).sum(1) + y.square().sum(1))).T   # [B, P]
    # |sqrt(a + e) - sqrt(a)| <= e / (2 sqrt(a)), and <= sqrt(e) near zero.
    atol_map = torch.minimum(err_sq / (2 * want.double().clamp_min(1e-300)), err_sq.sqrt())
    return 0.0, atol_map.max().item() if atol_map.numel() else 0.0
