"""ONNX lowerings of the two custom ops, for torch.onnx's exporter (``dynamo=True``).

torch.onnx takes translations of custom ops through its ``custom_translation_table``
argument; `translation_table()` returns ours, so any module that calls `affine_sample` or
`mahalanobis` exports to standard ONNX:

    torch.onnx.export(module, args, dynamo=True, custom_translation_table=translation_table())

- affine_sample -> MatMul(base grid, theta^T) + GridSample: affine_grid's base grid is a
  constant (the output size is static), so only [N, H*W, 3] x [N, 3, 2] runs; GridSample
  takes the same mode, padding_mode and align_corners as the op.
- mahalanobis -> the packed factor is unpacked by one Gather (from constants, so the ONNX
  optimiser or ONNX Runtime folds it once) and the distance is ||L (x - mean)|| as
  MatMul + ReduceSum: the triangular form, never the full inverse covariance.

Needs the optional packages onnx and onnxscript (``pip install "stnpadim[export]"``).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _backend
from ..errors import InputError

# Codes of ATen's GridSamplerInterpolation / GridSamplerPadding, as the op takes them, in
# the spelling of ONNX GridSample (opset 16+, which torch.onnx's torchlib also emits).
_MODES = ("bilinear", "nearest", "bicubic")
_PADDINGS = ("zeros", "border", "reflection")


def _onnxscript():
    try:
        import onnx_ir as ir
        from onnxscript import opset18 as op
    except ImportError:
        raise InputError("ONNX export needs the optional packages onnx and onnxscript: "
                         'pip install "stnpadim[export]"') from None
    return op, ir


def base_grid(height: int, width: int, align_corners: bool) -> np.ndarray:
    """affine_grid's base grid, [H * W, 3] float32 rows (x, y, 1), row-major over (y, x)."""

    def steps(n: int) -> np.ndarray:
        if n <= 1:  # as torch's affine_grid: a single step sits at 0
            return np.zeros(n)
        if align_corners:
            return np.linspace(-1.0, 1.0, n)
        return (2.0 * np.arange(n) + 1.0) / n - 1.0

    ys, xs = np.meshgrid(steps(height), steps(width), indexing="ij")
    return np.stack([xs, ys, np.ones_like(xs)], -1).reshape(height * width, 3).astype(np.float32)


def unpack_index(dim: int) -> np.ndarray:
    """[C * C] positions in a packed lower factor padded by one zero (index C(C+1)/2).

    Gathering a [P, C(C+1)/2 + 1] padded factor at these positions gives the dense [P, C*C]
    lower-triangular factor (row-major), zeros above the diagonal.
    """
    rows, cols = np.tril_indices(dim)
    index = np.full(dim * dim, rows.size, dtype=np.int64)
    index[rows * dim + cols] = np.arange(rows.size)
    return index


def affine_sample_onnx(x, theta, out_h: int, out_w: int, interpolation: int, padding: int,
                       align_corners: bool):
    """ONNX form of stnpadim::affine_sample: x [N, C, H, W], theta [N, 2, 3] -> [N, C, out_h, out_w]."""
    op, ir = _onnxscript()
    grid = op.CastLike(op.Constant(value=ir.tensor(base_grid(out_h, out_w, align_corners))), theta)
    grid = op.MatMul(grid, op.Transpose(theta, perm=[0, 2, 1]))                    # [N, H*W, 2]
    grid = op.Reshape(grid, op.Constant(value_ints=[-1, out_h, out_w, 2]))
    return op.GridSample(x, grid, align_corners=bool(align_corners), mode=_MODES[interpolation],
                         padding_mode=_PADDINGS[padding])


def mahalanobis_onnx(emb, mean, factor_packed):
    """ONNX form of stnpadim::mahalanobis: emb [B, C, P], mean [P, C], factor [P, C(C+1)/2] -> [B, P].

    Distances, not squared; float64 for float64 embeddings, else float32 (as the op).
    """
    op, ir = _onnxscript()
    dim = mean.shape[1]
    if not isinstance(dim, int):
        raise InputError("mahalanobis: the embedding dimension must be static to export to ONNX")
    padded = op.Pad(factor_packed, op.Constant(value_ints=[0, 0, 0, 1]))            # [P, K + 1]
    factor = op.Gather(padded, op.Constant(value=ir.tensor(unpack_index(dim))), axis=1)
    factor_t = op.Transpose(op.Reshape(factor, op.Constant(value_ints=[-1, dim, dim])), perm=[0, 2, 1])
    if emb.dtype == ir.DataType.DOUBLE:
        mean, factor_t = op.Cast(mean, to=ir.DataType.DOUBLE), op.Cast(factor_t, to=ir.DataType.DOUBLE)
    else:
        emb = op.Cast(emb, to=ir.DataType.FLOAT)
    delta = op.Sub(op.Transpose(emb, perm=[2, 0, 1]), op.Unsqueeze(mean, op.Constant(value_ints=[1])))
    rows = op.MatMul(delta, factor_t)                                               # [P, B, C] = L delta
    squared = op.ReduceSum(op.Mul(rows, rows), op.Constant(value_ints=[2]), keepdims=0)
    return op.Transpose(op.Sqrt(op.Max(squared, op.Constant(value_float=0.0))), perm=[1, 0])


def translation_table() -> dict:
    """{custom op overload: ONNX translation} for torch.onnx.export(..., custom_translation_table=).

    Empty when the compiled extension is not loaded: the pure-PyTorch reference ops then
    run in its place and export as standard ATen operators.
    """
    _onnxscript()  # a missing package is reported here, before minutes of tracing
    if not _backend.HAS_EXT:
        return {}
    ops = torch.ops.stnpadim
    table = {}
    if hasattr(ops, "affine_sample"):
        table[ops.affine_sample.default] = affine_sample_onnx
    if hasattr(ops, "mahalanobis"):
        table[ops.mahalanobis.default] = mahalanobis_onnx
    return table
