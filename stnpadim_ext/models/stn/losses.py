"""Image and pose losses for training the STN.

Photometric loss (the paper's): L1 + alpha * L2 + beta * (1 - MS-SSIM), restricted to the
valid region (pixels whose source lies inside the original image). pytorch_msssim's
ms_ssim needs min(H, W) > (win_size - 1) * 16 for its 5 scales, so the window shrinks
with the image (11 from 161 px, 7 from 97 px, 3 from 33 px) and below 33 px a
single-scale SSIM stands in. data_range is 1.0: images are in [0, 1].
"""
from __future__ import annotations

import torch
from pytorch_msssim import ms_ssim, ssim

from .transforms import to_homogeneous


def msssim_score(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image MS-SSIM of x, y [B, C, H, W] in [0, 1] -> [B] (SSIM below 33 px, see above)."""
    side = min(x.shape[-2:])
    for win in (11, 9, 7, 5, 3):
        if side > (win - 1) * 16:
            return ms_ssim(x, y, data_range=1.0, size_average=False, win_size=win)
    win = max(3, min(11, side - (1 - side % 2)))  # odd and no larger than the image
    return ssim(x, y, data_range=1.0, size_average=False, win_size=win)


def photometric_loss(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 + alpha * L2 + beta * (1 - MS-SSIM) on the valid region.

    Args:
        output, target: [B, C, H, W] in [0, 1].
        mask: [B, 1, H, W] in [0, 1], 1 where both images hold real content. Outside it both
            images are zeroed, so MS-SSIM compares only the valid content (and the zeros).
        alpha, beta: weights of the L2 and (1 - MS-SSIM) terms.

    Returns:
        (loss scalar, per-image MS-SSIM [B] of the masked images).
    """
    output, target = output * mask, target * mask
    diff = output - target
    weight = mask.sum() * output.shape[1] + 1e-6
    l1 = diff.abs().sum() / weight
    l2 = diff.square().sum() / weight
    score = msssim_score(output.clamp(0, 1), target.clamp(0, 1))
    return l1 + alpha * l2 + beta * (1 - score.mean()), score


def pose_loss(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of two thetas [B, 2, 3] (0 when the maps are equal).

    On the rotation part this is 4 (1 - cos(angle difference)) per image: smooth and free
    of angle wrap-around, so it works for any rotation.
    """
    return (to_homogeneous(first) - to_homogeneous(second)).square().sum((1, 2)).mean()
