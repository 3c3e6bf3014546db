"""affine_sample: grid_sample(x, affine_grid(theta)) without materialising the grid.

PLACEHOLDER (reference only) until the kernels land: the public signature is final.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def affine_sample_reference(x, theta, size=None, mode="bilinear", padding_mode="zeros",
                            align_corners=False):
    """The oracle: torch's affine_grid + grid_sample composition."""
    size = tuple(x.shape[-2:]) if size is None else tuple(size)
    grid = F.affine_grid(theta, (x.shape[0], x.shape[1], *size), align_corners=align_corners)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def affine_sample(x: torch.Tensor, theta: torch.Tensor, size=None, mode: str = "bilinear",
                  padding_mode: str = "zeros", align_corners: bool = False) -> torch.Tensor:
    """Samples x [N, C, H, W] at affine_grid(theta [N, 2, 3]) -> [N, C, *size]."""
    return affine_sample_reference(x, theta, size, mode, padding_mode, align_corners)
