"""Affine transforms in the affine_grid convention: building, composing, inverting, measuring.

Every theta here is [B, 2, 3] and maps *output* normalised coordinates (x, y in [-1, 1],
align_corners=False) to *input* normalised coordinates, exactly as F.affine_grid reads it:
warp(x, theta)(p) = x(theta p). Two warps in a row compose as one matrix product,
warp(warp(x, A), B) = warp(x, A @ B), which is what `compose` computes.

Rotations and scales are defined in pixel-proportional coordinates (u = x W/2, v = y H/2),
so a rotation stays a rotation on non-square images; `aspect` = W / H carries that.
"""
from __future__ import annotations

import math

import torch


def similarity_theta(angle: torch.Tensor, translation: torch.Tensor, log_scale: torch.Tensor,
                     aspect: float = 1.0) -> torch.Tensor:
    """Theta of input = exp(log_scale) * R(angle) * output + translation.

    Args:
        angle: [B] radians.
        translation: [B, 2] (tx, ty) in normalised units (1.0 = half the width / height).
        log_scale: [B]; > 0 samples a larger region of the input (the output zooms out).
        aspect: image width / height.

    Returns:
        theta [B, 2, 3].
    """
    return affine_theta(angle, log_scale, torch.zeros_like(angle), log_scale, translation, aspect)


def affine_theta(angle: torch.Tensor, log_sx: torch.Tensor, shear: torch.Tensor,
                 log_sy: torch.Tensor, translation: torch.Tensor,
                 aspect: float = 1.0) -> torch.Tensor:
    """Theta of an orientation-preserving affine map: R(angle) @ [[sx, shear], [0, sy]] + t.

    Every affine map with det > 0 has exactly one such form (QR decomposition with a
    positive diagonal), so this covers them all and never mirrors the image.

    Args:
        angle, log_sx, shear, log_sy: [B] each (radians, log scales, shear factor).
        translation: [B, 2] in normalised units.
        aspect: image width / height.

    Returns:
        theta [B, 2, 3].
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx, sy = torch.exp(log_sx), torch.exp(log_sy)
    linear = torch.stack([torch.stack([cos * sx, cos * shear - sin * sy], -1),
                          torch.stack([sin * sx, sin * shear + cos * sy], -1)], -2)
    return _physical_to_normalised(linear, translation, aspect)


def _physical_to_normalised(linear: torch.Tensor, translation: torch.Tensor,
                            aspect: float) -> torch.Tensor:
    # Normalised x spans W/2 pixels, y spans H/2: conjugate the pixel-space linear part by
    # diag(W/2, H/2) so rotations are rotations in pixels.
    scale = linear.new_tensor([[1.0, 1.0 / aspect], [aspect, 1.0]])
    return torch.cat([linear * scale, translation[..., None]], dim=-1)


def to_homogeneous(theta: torch.Tensor) -> torch.Tensor:
    """[B, 2, 3] -> [B, 3, 3] with last row (0, 0, 1)."""
    bottom = theta.new_tensor([0.0, 0.0, 1.0]).expand(theta.shape[0], 1, 3)
    return torch.cat([theta, bottom], dim=1)


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Theta of warp(warp(x, first), second), i.e. the map p -> first(second(p)). [B, 2, 3]."""
    return (to_homogeneous(first) @ to_homogeneous(second))[:, :2]


def invert_theta(theta: torch.Tensor) -> torch.Tensor:
    """Inverse map of theta [B, 2, 3] (closed form, differentiable).

    warp(warp(x, theta), invert_theta(theta)) == x wherever theta's output stays in bounds;
    PaDiM uses it to bring an anomaly map from the aligned frame back to the input frame.
    """
    if theta.dim() != 3 or tuple(theta.shape[1:]) != (2, 3):
        raise ValueError(f"theta must have shape [B, 2, 3]; got {list(theta.shape)}")
    a, b = theta[:, 0, 0], theta[:, 0, 1]
    c, d = theta[:, 1, 0], theta[:, 1, 1]
    det = a * d - b * c
    inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / det[:, None, None]
    t = -(inv @ theta[:, :, 2:])
    return torch.cat([inv, t], dim=-1)


def identity_theta(batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[batch, 2, 3] identity thetas."""
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=device, dtype=dtype)
    return eye.expand(batch, 2, 3).clone()


def random_similarity(batch: int, rotation: float, translation: float, scale: float,
                      generator: torch.Generator | None = None, aspect: float = 1.0,
                      device=None) -> torch.Tensor:
    """Random proper similarity transforms (det > 0), uniform in the given ranges.

    Args:
        batch: how many.
        rotation: angles uniform in [-rotation, rotation] degrees (180 = any angle).
        translation: tx, ty each uniform in [-translation, translation], normalised units
            (0.1 = 5% of the image size).
        scale: scale factor log-uniform in [1/scale, scale]; scale >= 1.
        generator: torch.Generator for reproducible draws.
        aspect: image width / height.

    Returns:
        theta [batch, 2, 3].
    """
    if rotation < 0 or translation < 0 or scale < 1:
        raise ValueError(f"transform ranges must be rotation >= 0, translation >= 0, scale >= 1; "
                         f"got rotation={rotation}, translation={translation}, scale={scale}")
    u = torch.rand(batch, 4, generator=generator) * 2 - 1
    angle = u[:, 0] * math.radians(rotation)
    shift = u[:, 1:3] * translation
    log_scale = u[:, 3] * math.log(scale)
    return similarity_theta(angle, shift, log_scale, aspect).to(device)


def least_squares_shift(theta: torch.Tensor) -> torch.Tensor:
    """The output-frame shift g [2] minimising sum_i |t_i + L_i g|^2 over theta [N, 2, 3]
    (L_i linear part, t_i translation): composing every theta with the translation g
    centres them, i.e. the input points the output centres land on average out to 0."""
    linear, t = theta[:, :, :2], theta[:, :, 2]
    lhs = (linear.transpose(1, 2) @ linear).sum(0)
    rhs = -(linear.transpose(1, 2) @ t[..., None]).sum(0)[:, 0]
    return torch.linalg.solve(lhs, rhs)


def centring_theta(theta: torch.Tensor, aspect: float = 1.0) -> torch.Tensor:
    """C [1, 2, 3] such that compose(theta, C) over theta [N, 2, 3] is centred on the identity:
    circular-mean rotation 0, mean log-scale 0, least-squares translation 0.

    The inverse of C is the set's mean pose. Computed in float64.
    """
    theta = theta.detach().double()
    pose = theta_pose(theta, aspect)
    angle = torch.deg2rad(pose["rotation_deg"])
    mean_angle = torch.atan2(angle.sin().mean(), angle.cos().mean())
    zero = theta.new_zeros(1)
    linear = similarity_theta(-mean_angle[None], theta.new_zeros(1, 2),
                              -pose["log_scale"].mean()[None], aspect)
    # R^-1 S^-1 first (about the output centre), then the shift that centres the result.
    shift = least_squares_shift(compose(theta, linear.expand(theta.shape[0], 2, 3)))
    return compose(linear, similarity_theta(zero, shift[None], zero, aspect)).float()


def theta_pose(theta: torch.Tensor, aspect: float = 1.0) -> dict[str, torch.Tensor]:
    """Rotation (degrees), log-scale and translation (normalised) of theta [B, 2, 3].

    For a general affine map the angle is that of the nearest rotation
    (atan2(m10 - m01, m00 + m11) of the pixel-space linear part) and the log-scale is
    half the log-determinant.
    """
    scale = theta.new_tensor([[1.0, aspect], [1.0 / aspect, 1.0]])
    linear = theta[:, :, :2] * scale
    angle = torch.atan2(linear[:, 1, 0] - linear[:, 0, 1], linear[:, 0, 0] + linear[:, 1, 1])
    det = linear[:, 0, 0] * linear[:, 1, 1] - linear[:, 0, 1] * linear[:, 1, 0]
    return {"rotation_deg": torch.rad2deg(angle), "log_scale": 0.5 * torch.log(det),
            "translation": theta[:, :, 2]}
