"""affine_sample: grid_sample(x, affine_grid(theta)) without materialising the grid.

The compiled op (`torch.ops.stnpadim.affine_sample`, CPU and CUDA kernels in csrc/ops/)
computes every sampling coordinate on the fly, in the forward and the backward pass.
This module validates arguments, dispatches to the op or to the pure-PyTorch reference,
and registers the op's fake (meta) kernels and autograd formula with torch.library.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend
from ..errors import InputError

# Codes of ATen's GridSamplerInterpolation / GridSamplerPadding, as the op takes them.
_MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
_PADDINGS = {"zeros": 0, "border": 1, "reflection": 2}
_NEAREST = _MODES["nearest"]
# dtypes the kernels take, per device type; others use the reference.
_KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}
# Computed in float32 (coordinates included) and rounded once to their own dtype.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def affine_sample_reference(x, theta, size=None, mode="bilinear", padding_mode="zeros",
                            align_corners=False):
    """The oracle: torch's affine_grid + grid_sample composition (materialises the grid).

    float16 / bfloat16 follow affine_sample's contract: the composition runs in float32 on
    the upcast x and theta and the result is rounded to the input dtype. (torch's own
    low-precision path is not used: its CPU sampler wraps 16-bit tap offsets on planes of
    2^15 elements or more, and on both devices affine_grid rounds coordinates to the dtype.)
    """
    size = tuple(x.shape[-2:]) if size is None else tuple(size)
    if x.dtype in _LOW_PRECISION:
        out = affine_sample_reference(x.float(), theta.float(), size, mode, padding_mode, align_corners)
        return out.to(x.dtype)
    grid = F.affine_grid(theta, (x.shape[0], x.shape[1], *size), align_corners=align_corners)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def _output_size(x, size):
    if size is None:
        return x.shape[-2], x.shape[-1]
    try:
        out_h, out_w = size
    except (TypeError, ValueError):
        raise InputError(f"affine_sample: size must be a pair (height, width), got {size!r}") from None
    for v in (out_h, out_w):
        if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
            raise InputError(f"affine_sample: size must be a pair of ints, got {size!r}")
    if out_h <= 0 or out_w <= 0:
        raise InputError(f"affine_sample: size must be positive, got {tuple(size)}")
    return out_h, out_w


def _check_args(x, theta, size, mode, padding_mode):
    """Validates the arguments of affine_sample; returns the output size (out_h, out_w)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = f"{x.dim()}-D tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"affine_sample: x must be a 4-D tensor [N, C, H, W], got a {got}")
    if not x.is_floating_point():
        raise InputError(f"affine_sample: x must be a floating-point tensor, got {x.dtype}")
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        raise InputError(f"affine_sample: x must have a non-empty spatial size, got {tuple(x.shape)}")
    if not isinstance(theta, torch.Tensor) or theta.dim() != 3 or tuple(theta.shape[1:]) != (2, 3):
        got = tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__
        raise InputError(f"affine_sample: theta must have shape [N, 2, 3], got {got}")
    if theta.shape[0] != x.shape[0]:
        raise InputError(f"affine_sample: theta has {theta.shape[0]} matrices but x has "
                         f"{x.shape[0]} images")
    if theta.device != x.device:
        raise InputError(f"affine_sample: theta is on {theta.device} but x is on {x.device}")
    if theta.dtype != x.dtype:
        raise InputError(f"affine_sample: theta dtype {theta.dtype} differs from x dtype {x.dtype}")
    if mode not in _MODES:
        raise InputError(f"affine_sample: unknown mode {mode!r}; expected one of {list(_MODES)}")
    if padding_mode not in _PADDINGS:
        raise InputError(f"affine_sample: unknown padding_mode {padding_mode!r}; expected one of "
                         f"{list(_PADDINGS)}")
    return _output_size(x, size)


def _use_kernel(x):
    return (x.dtype in _KERNEL_DTYPES.get(x.device.type, ())
            and _backend.use_extension("affine_sample", x))


def affine_sample(x: torch.Tensor, theta: torch.Tensor, size=None, mode: str = "bilinear",
                  padding_mode: str = "zeros", align_corners: bool = False) -> torch.Tensor:
    """Samples images at an affine transform of the output grid, as an STN does.

    Equal to ``F.grid_sample(x, F.affine_grid(theta, (N, C, *size), align_corners), mode,
    padding_mode, align_corners)``, but no grid tensor is built: each output pixel's
    sampling point is computed on the fly, in the forward and in the backward pass.
    Differentiable in ``x`` and ``theta`` (first derivatives only).

    Example:
        >>> x = torch.rand(2, 3, 32, 32)
        >>> theta = torch.eye(2, 3).expand(2, 2, 3)
        >>> affine_sample(x, theta, size=(16, 16)).shape
        torch.Size([2, 3, 16, 16])

    float16 and bfloat16 (on CPU and CUDA alike) are computed in float32: ``theta`` and the
    pixels are upcast exactly, the sampling coordinates, weights and sums are float32, and
    the result (and in the backward, each gradient) is rounded once to the input dtype. So
    ``affine_sample(x, theta)`` equals ``affine_sample(x.float(), theta.float()).to(x.dtype)``
    up to that rounding: half a unit in the last place of the dtype. That is more accurate
    than torch's own low-precision composition, which rounds the affine_grid coordinates to
    the dtype (bfloat16: 2^-8 relative, several pixels at 1000 px; nearest sampling may
    then pick another pixel), and torch's CPU sampler is never used for these dtypes (in
    torch 2.14 it wraps 16-bit tap offsets once a plane spans 2^15 elements: wrong values,
    out-of-bounds reads and writes).

    Args:
        x (Tensor[N, C, H, W]): images or feature maps, floating point (float32, float64,
            float16 or bfloat16; any layout or strides).
        theta (Tensor[N, 2, 3]): one affine matrix per image, mapping normalised output
            coordinates to normalised input coordinates (affine_grid's convention); same
            device and dtype as ``x``.
        size (tuple[int, int], optional): output (height, width). Default: x's (H, W).
        mode (str): "bilinear" (default), "nearest" or "bicubic".
        padding_mode (str): "zeros" (default), "border" or "reflection".
        align_corners (bool): as in F.affine_grid / F.grid_sample. Default: False.

    Returns:
        Tensor[N, C, *size], contiguous, of x's dtype.

    Raises:
        InputError (a ValueError): bad shapes, dtypes, devices, size or mode names.
    """
    out_h, out_w = _check_args(x, theta, size, mode, padding_mode)
    if _use_kernel(x):
        return torch.ops.stnpadim.affine_sample(x, theta, out_h, out_w, _MODES[mode],
                                                _PADDINGS[padding_mode], bool(align_corners))
    return affine_sample_reference(x, theta, (out_h, out_w), mode, padding_mode, align_corners)


class AffineSample(nn.Module):
    """Module form of :func:`affine_sample` with fixed output size and sampling options.

    Example:
        >>> sampler = AffineSample(size=(64, 64), padding_mode="border")
        >>> out = sampler(torch.rand(4, 3, 128, 128), torch.eye(2, 3).expand(4, 2, 3))

    Args:
        size (tuple[int, int], optional): output (height, width); default: the input's.
        mode (str): "bilinear" (default), "nearest" or "bicubic".
        padding_mode (str): "zeros" (default), "border" or "reflection".
        align_corners (bool): default False.
    """

    def __init__(self, size=None, mode: str = "bilinear", padding_mode: str = "zeros",
                 align_corners: bool = False):
        super().__init__()
        if mode not in _MODES:
            raise InputError(f"AffineSample: unknown mode {mode!r}; expected one of {list(_MODES)}")
        if padding_mode not in _PADDINGS:
            raise InputError(f"AffineSample: unknown padding_mode {padding_mode!r}; expected one "
                             f"of {list(_PADDINGS)}")
        self.size = None if size is None else tuple(size)
        self.mode = mode
        self.padding_mode = padding_mode
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W], theta [N, 2, 3] -> [N, C, *size]."""
        return affine_sample(x, theta, self.size, self.mode, self.padding_mode, self.align_corners)

    def extra_repr(self) -> str:
        return (f"size={self.size}, mode={self.mode!r}, padding_mode={self.padding_mode!r}, "
                f"align_corners={self.align_corners}")


# ----------------------------------------------------------------------------- registrations
# Fake kernels (shapes for torch.compile / meta tensors) and the autograd formula of the
# compiled op. The backward is itself an op, so compiled graphs trace it too.

def _fake_affine_sample(x, theta, out_h, out_w, interpolation, padding, align_corners):
    torch._check(x.dim() == 4, lambda: f"affine_sample: input must be 4-D, got {x.dim()}-D")
    torch._check(theta.dim() == 3 and theta.shape[0] == x.shape[0]
                 and theta.shape[1] == 2 and theta.shape[2] == 3,
                 lambda: f"affine_sample: theta must have shape [N, 2, 3], got {tuple(theta.shape)}")
    torch._check(theta.dtype == x.dtype, lambda: "affine_sample: theta and input dtypes differ")
    torch._check(out_h > 0 and out_w > 0, lambda: "affine_sample: output size must be positive")
    return x.new_empty((x.shape[0], x.shape[1], out_h, out_w))


def _fake_affine_sample_backward(grad_output, x, theta, in_h, in_w, interpolation, padding,
                                 align_corners, input_grad, theta_grad):
    torch._check(grad_output.dim() == 4, lambda: "affine_sample backward: grad_output must be 4-D")
    n, c = grad_output.shape[:2]
    grad_x = grad_output.new_empty((n, c, in_h, in_w) if input_grad else (0,))
    grad_theta = theta.new_empty((n, 2, 3) if theta_grad else (0,))
    return grad_x, grad_theta


def _setup_context(ctx, inputs, output):
    x, theta, _, _, interpolation, padding, align_corners = inputs
    ctx.in_size = (x.shape[-2], x.shape[-1])
    ctx.options = (interpolation, padding, align_corners)
    # x's values only enter theta's gradient (nearest sampling has none).
    keep_x = ctx.needs_input_grad[1] and interpolation != _NEAREST
    ctx.save_for_backward(x if keep_x else None, theta)


def _backward(ctx, grad_output):
    x, theta = ctx.saved_tensors
    x_grad, theta_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_theta = torch.ops.stnpadim._affine_sample_backward(
        grad_output, x, theta, *ctx.in_size, *ctx.options, x_grad, theta_grad)
    return (grad_x if x_grad else None, grad_theta if theta_grad else None,
            None, None, None, None, None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("affine_sample supports first derivatives only: double backward "
                       "(e.g. autograd.grad(..., create_graph=True) then backward) is not implemented")


def _register():
    if not (_backend.HAS_EXT and hasattr(torch.ops.stnpadim, "affine_sample")):
        return
    torch.library.register_fake("stnpadim::affine_sample", _fake_affine_sample)
    torch.library.register_fake("stnpadim::_affine_sample_backward", _fake_affine_sample_backward)
    torch.library.register_autograd("stnpadim::affine_sample", _backward,
                                    setup_context=_setup_context)
    torch.library.register_autograd("stnpadim::_affine_sample_backward", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


_register()
