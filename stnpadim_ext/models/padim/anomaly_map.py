"""From per-patch distances to an anomaly map in the input image's frame.

distance [B, P] -> [B, h, w] -> bilinear upsample to the model's input grid -> separable
Gaussian blur (sigma 4, as the PaDiM paper and anomalib; the two fused into one matrix per
axis) -> resize, or warp back by the inverse of the STN / crop transform, into the input
image's resolution.

The blur runs on the model's input grid (image_size, or the crop), so sigma = 4 px means what
it means in the paper at 224-256 px, whatever the resolution of the images handed in.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ...ops.affine_sample import affine_sample
from ..blur import border_mode, gaussian_kernel1d


def _upsample_blur_operator(n_in: int, n_out: int, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """[n_out, n_in]: bilinear resampling of one axis followed by the blur, as one matrix."""
    basis = torch.eye(n_in, dtype=kernel.dtype, device=kernel.device).view(n_in, 1, n_in, 1)
    x = F.interpolate(basis, size=(n_out, 1), mode="bilinear", align_corners=False)
    radius = kernel.numel() // 2
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))
    return x[:, 0, :, 0].T


@functools.lru_cache(maxsize=16)
def _map_operators(grid: tuple[int, int], size: tuple[int, int], sigma: float, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [size[0], grid[0]], cols^T [grid[1], size[1]]) of distance_to_map, built once per
    shape: rebuilding them per batch costs a dozen small kernel launches on a GPU. Never
    written to by callers."""
    kernel = gaussian_kernel1d(sigma, device=device, dtype=torch.float64)
    mode = border_mode(kernel.numel() // 2, *size)
    rows = _upsample_blur_operator(grid[0], size[0], kernel, mode).to(dtype)
    cols = _upsample_blur_operator(grid[1], size[1], kernel, mode).to(dtype)
    return rows, cols.T


def distance_to_map(distance: torch.Tensor, grid: tuple[int, int], size: tuple[int, int],
                    sigma: float = 4.0) -> torch.Tensor:
    """Distances [B, h*w] on the embedding grid -> smoothed map [B, *size] on the model's input grid.

    Equals gaussian_blur(bilinear upsampling): both are separable and linear, so each axis
    is one small [size, grid] matrix (built in float64, cached per shape, sigma, device and
    dtype) and the map is rows @ d @ cols^T, ~10x cheaper than convolving the upsampled maps.
    """
    # While tracing or exporting (ONNX, torch.export) the tensors may be fake or symbolic:
    # build the operators then, never cache them.
    tracing = (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
               or type(distance) is not torch.Tensor)
    build = _map_operators.__wrapped__ if tracing else _map_operators
    rows, cols_t = build(tuple(grid), tuple(size), float(sigma), distance.device, distance.dtype)
    return rows @ distance.view(-1, *grid) @ cols_t


def to_input_frame(maps: torch.Tensor, size: tuple[int, int],
                   theta: torch.Tensor | None = None) -> torch.Tensor:
    """Maps [B, S1, S2] on the model's input grid -> [B, *size] in the input image's frame.

    Args:
        maps: smoothed maps on the model's grid.
        size: (H, W) of the input images.
        theta: [B, 2, 3] affine_grid matrix taking input-frame normalised coordinates to the
            model grid's (the inverse of the STN / crop transform), or None when the model
            grid is just the resized input.

    Input pixels whose source lies outside the model's view (corners the STN turned out of
    the frame, the margin of a crop) take the value of the nearest pixel it did see (border
    padding): 0 would call them perfectly normal although nobody looked. How much of each
    image that is: `out_of_view`.
    """
    if theta is None:
        if tuple(maps.shape[-2:]) == tuple(size):
            return maps
        return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return affine_sample(maps[:, None], theta.to(maps.dtype), size=size, padding_mode="border")[:, 0]


def out_of_view(theta: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Pixels of each input image that the model's view did not cover: bool [B, *size].

    Args:
        theta: [B, 2, 3] as for `to_input_frame`.
        grid: (S1, S2) of the model's input grid.
        size: (H, W) of the input images.

    A pixel counts as out of view when less than half of its bilinear sample falls inside
    the model's grid.
    """
    ones = theta.new_ones(theta.shape[0], 1, *grid)
    coverage = affine_sample(ones, theta, size=size, padding_mode="zeros")
    return coverage[:, 0] < 0.5
