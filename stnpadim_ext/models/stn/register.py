"""Pseudo-poses for images in arbitrary poses, by congealing: rigid registration to a template.

The "canonical" objective asks two views of one image to land on the same output. That
alone cannot be learnt from a network that starts at one constant pose: to be consistent
its predicted angle must wind once around the circle as the input turns once, and
gradient descent does not leave the constant solution (measured: 113 deg mean error
after 600 steps, chance level). It also never asks two *different* parts to agree.
Registering every training image to a common template gives each one a pose in one
shared frame; the STN is then taught that frame (see train.py).

Registration: exhaustive over `n_angles` rotations, every shift at once by FFT
cross-correlation, parabolic refinement of the best angle; images are grey, zero-mean
and windowed by a disc so a rotation does not move the window. The template starts as
the first image and is then the mean of the registered images, `iterations` times.
"""
from __future__ import annotations

import math

import torch

from ...ops.affine_sample import affine_sample
from .transforms import compose, least_squares_shift, similarity_theta


def _prepare(images: torch.Tensor) -> torch.Tensor:
    """Grey, zero-mean inside the inscribed disc, zero outside it: [N, 1, H, W]."""
    grey = images.mean(1, keepdim=True)
    h, w = grey.shape[-2:]
    ys = (torch.arange(h, dtype=grey.dtype, device=grey.device) + 0.5) * 2 / h - 1
    xs = (torch.arange(w, dtype=grey.dtype, device=grey.device) + 0.5) * 2 / w - 1
    disc = ((xs.square()[None] + ys.square()[:, None]) < 1).to(grey.dtype)
    mean = (grey * disc).sum((2, 3), keepdim=True) / disc.sum()
    return (grey - mean) * disc


def _rotate(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """images [N, 1, H, W] sampled at rotations angles [N] about the centre (border padding)."""
    n = images.shape[0]
    aspect = images.shape[-1] / images.shape[-2]
    theta = similarity_theta(angles, images.new_zeros(n, 2), images.new_zeros(n), aspect)
    return affine_sample(images, theta, padding_mode="border")


def _orbit(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] x [K] -> [N, K, H, W]: image i at rotation k."""
    n, k = images.shape[0], angles.shape[0]
    rotated = _rotate(images.repeat_interleave(k, 0), angles.repeat(n))
    return rotated.view(n, k, *images.shape[-2:])


def _correlate(moving: torch.Tensor, template: torch.Tensor):
    """Best circular-free shift per (image, rotation): moving [N, K, H, W], template [H, W].

    Returns (score [N, K], shift [N, K, 2] in pixels (dx, dy)) with
    moving(p + shift) ~= template(p).
    """
    h, w = template.shape
    size = (2 * h, 2 * w)  # zero-padded: no wrap-around
    prod = torch.fft.rfft2(moving, s=size) * torch.fft.rfft2(template, s=size).conj()
    corr = torch.fft.irfft2(prod, s=size).flatten(2)
    score, index = corr.max(-1)
    dy, dx = index // size[1], index % size[1]
    dy = torch.where(dy >= h, dy - size[0], dy)
    dx = torch.where(dx >= w, dx - size[1], dx)
    return score, torch.stack([dx, dy], -1).to(moving.dtype)


@torch.no_grad()
def register(images: torch.Tensor, template: torch.Tensor, n_angles: int = 72,
             chunk: int = 16) -> torch.Tensor:
    """Pose of each image relative to `template`: theta [N, 2, 3] with
    warp(image, theta) ~= template (rotation + translation).

    Args:
        images: [N, 3, H, W] in [0, 1].
        template: [3, H, W] in [0, 1], the same size.
        n_angles: rotations tried (evenly over 360 deg); the best is refined by a parabola.
        chunk: images registered at once (memory: chunk * n_angles FFTs of 2H x 2W).
    """
    ref = _prepare(template[None])[0, 0]
    return torch.cat([_register(_prepare(part), ref, n_angles) for part in images.split(chunk)])


def _register(moving: torch.Tensor, ref: torch.Tensor, n_angles: int) -> torch.Tensor:
    n, (h, w) = moving.shape[0], moving.shape[-2:]
    step = 2 * math.pi / n_angles
    angles = torch.arange(n_angles, dtype=moving.dtype, device=moving.device) * step
    score, _ = _correlate(_orbit(moving, angles), ref)
    best = score.argmax(1)
    rows = torch.arange(n, device=moving.device)
    left, mid, right = (score[rows, (best + d) % n_angles] for d in (-1, 0, 1))
    curvature = left - 2 * mid + right
    offset = torch.where(curvature < 0, 0.5 * (left - right) / curvature.clamp(max=-1e-12), 0.0)
    angle = angles[best] + offset.clamp(-0.5, 0.5) * step
    # The shift is searched again at the refined angle.
    _, shift = _correlate(_rotate(moving, angle), ref)
    translation = shift[:, 0] * moving.new_tensor([2.0 / w, 2.0 / h])
    zero = moving.new_zeros(n)
    rotation = similarity_theta(angle, moving.new_zeros(n, 2), zero, w / h)
    return compose(rotation, similarity_theta(zero, translation, zero, w / h))


@torch.no_grad()
def congeal(images: torch.Tensor, iterations: int = 2,
            n_angles: int = 72) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-poses putting all images in one shared frame, and that frame's template.

    The frame's centre is then moved to minimise the mean squared translation of the
    poses (the framing criterion of the canonical objective), so parts end up centred.

    Args:
        images: [N, 3, H, W] in [0, 1], N >= 1.
        iterations: template refinements after the first registration.
        n_angles: rotations tried per registration.

    Returns:
        (poses [N, 2, 3]: warp(images[i], poses[i]) is image i in the shared frame,
        template [3, H, W]: their mean in that frame, to register other images with).
    """
    template = images[0]
    for _ in range(iterations + 1):
        poses = register(images, template, n_angles)
        template = affine_sample(images, poses, padding_mode="border").mean(0)
    poses = _centre(poses, images.shape[-1] / images.shape[-2])
    return poses, affine_sample(images, poses, padding_mode="border").mean(0)


def _centre(poses: torch.Tensor, aspect: float) -> torch.Tensor:
    """poses @ T(g) with g = argmin sum_i |t_i + L_i g|^2 (least squares, closed form)."""
    g = least_squares_shift(poses)
    zero = poses.new_zeros(poses.shape[0])
    return compose(poses, similarity_theta(zero, g.expand(poses.shape[0], 2), zero, aspect))
