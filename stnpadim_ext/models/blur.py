"""Separable Gaussian blur, shared by PaDiM's anomaly maps and the STN's high-pass input."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, radius: int | None = None, device=None,
                      dtype=torch.float32) -> torch.Tensor:
    """Normalised Gaussian taps [2r + 1], built in float64.

    radius defaults to int(4 sigma + 0.5) (anomalib's / scipy's truncation).
    """
    radius = int(4.0 * sigma + 0.5) if radius is None else radius
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def border_mode(radius: int, height: int, width: int) -> str:
    # reflect padding needs the pad to be shorter than the side; replicate beyond that.
    return "reflect" if radius < min(height, width) else "replicate"


def gaussian_blur(x: torch.Tensor, sigma: float = 4.0, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur over the last two dims of x [..., H, W], reflected borders
    (anomalib's GaussianBlur2d; scipy's gaussian_filter with mode="mirror").

    Two 1-D passes cost 2(2r+1) multiply-adds per pixel instead of (2r+1)^2 for the 2-D kernel.
    """
    kernel = gaussian_kernel1d(sigma, radius, x.device, x.dtype)
    radius = kernel.numel() // 2
    height, width = x.shape[-2:]
    mode = border_mode(radius, height, width)
    y = x.reshape(-1, 1, height, width)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))
    return y.view(x.shape)
