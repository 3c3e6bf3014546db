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


def pose_loss(first: torch.Tensor, second: torch.Tensor, turns: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference of two thetas [B, 2, 3] (0 when the maps are equal).

    On the rotation part this is 4 (1 - cos(angle difference)) per image: smooth and free
    of angle wrap-around, so it works for any rotation. With `turns` [K, 2, 3] (the
    rotations that map a symmetric part onto itself, identity included) each image's
    difference is the smallest over first composed with any of them: a half-turned
    target is as right as the target itself for a 2-fold symmetric part, and averaging
    the two (what the plain loss would teach) is wrong for both.
    """
    if turns is None:
        return (to_homogeneous(first) - to_homogeneous(second)).square().sum((1, 2)).mean()
    b, k = first.shape[0], turns.shape[0]
    turned = to_homogeneous(first).repeat_interleave(k, 0) @ to_homogeneous(turns.repeat(b, 1, 1))
    target = to_homogeneous(second).repeat_interleave(k, 0)
    return (turned - target).square().sum((1, 2)).view(b, k).amin(1).mean()
