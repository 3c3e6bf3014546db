"""Self-supervised STN training (objectives "reconstruct" and "canonical") and its measurement.

reconstruct (the paper's): x' = warp(x, A) for a random similarity A; the STN sees x' and
must bring it back onto x: warp(x', theta(x')) ~= x, i.e. A @ theta == identity.

canonical (for parts that come in any pose): two random views x1 = warp(x, A1),
x2 = warp(x, A2) of one image must land on the same output, warp(x1, theta1) ~=
warp(x2, theta2), i.e. A1 @ theta1 == A2 @ theta2 =: C, the image's canonical frame.
Consistency alone is not learnable from scratch and does not make different parts agree
(register.py says why, with the measurement), so each training image also gets a
pseudo-pose P from congealing (rigid registration of all training images to a common
template, whose centre is placed where it minimises the parts' mean squared offset: the
framing criterion) and C is anchored to it. P has log-scale 0 and centres the parts,
so the output cannot collapse onto a zoomed-in blank area. Proper rotations only.

Both objectives use the paper's photometric loss (L1 + alpha L2 + beta (1 - MS-SSIM) on
the valid region; reconstruct: output vs x, canonical: output 1 vs output 2) plus gamma
times a pose term: the squared difference of the 3x3 matrices that should agree
(A theta vs identity; C1^-1 C2 and P^-1 C vs identity). The pose term is what makes
training converge in minutes on a CPU: the photometric gradient only sees
misalignments of a few pixels, the pose term sees any angle.
"""
from __future__ import annotations

import copy
import math
import time

import torch
from tqdm.auto import tqdm

from ..._threads import limit_threads
from ...data.images import as_float, iter_batches
from ...errors import InputError
from ...ops.affine_sample import affine_sample
from .losses import photometric_loss, pose_loss
from .network import STN
from .register import congeal, register
from .transforms import centring_theta, compose, identity_theta, invert_theta, random_similarity, theta_pose

OBJECTIVES = ("reconstruct", "canonical")
# Defaults measured on synth part_drift / part_random (python/stn_ablation.py): reconstruct
# converges in ~20 epochs of 512 views (about 35 s of one CPU core), canonical in ~40
# (about 100 s); the reconstruct range covers the +-30 deg test drift with margin.
DEFAULT_EPOCHS = {"reconstruct": 20, "canonical": 40}
DEFAULT_RANGES = {"reconstruct": {"rotation": 40.0, "translation": 0.15, "scale": 1.1},
                  "canonical": {"rotation": 180.0, "translation": 0.15, "scale": 1.1}}


@limit_threads()  # a tiny network: one thread is as fast quiet, far faster on a busy CPU
def train_stn(stn: STN, images, objective: str = "reconstruct", epochs: int | None = None,
              samples_per_epoch: int = 512, batch_size: int = 32, lr: float = 2e-3,
              alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
              rotation: float | None = None, translation: float | None = None,
              scale: float | None = None, image_size: int | None = 64,
              augment_padding: str = "border", val_fraction: float = 0.2, patience: int = 8,
              centre: bool = True, seed: int = 0, progress: bool = True) -> dict:
    """Trains `stn` in place, self-supervised, and returns its training history.

    Args:
        stn: the STN to train (left in eval mode, holding the best validation weights).
        images: good images: tensor [N, 3, H, W] in [0, 1], paths, a folder, or an iterable
            of batches (see stnpadim_ext.data.iter_batches). All are held in memory.
        objective: "reconstruct" or "canonical" (module docstring).
        epochs: maximum number of epochs; None takes DEFAULT_EPOCHS[objective].
        samples_per_epoch: random views drawn per epoch (cycling through the shuffled
            training split), so small data sets still get enough steps per epoch.
        batch_size: images per step.
        lr: Adam learning rate.
        alpha, beta: weights of L2 and (1 - MS-SSIM) beside L1 in the photometric loss.
        gamma: weight of the pose term.
        rotation, translation, scale: ranges of the random transforms (degrees, normalised
            units, scale factor >= 1); None takes DEFAULT_RANGES[objective].
        image_size: images are resized to this square size for training (theta is
            resolution-free, and the localization net sees 64 px anyway); None keeps
            their size.
        augment_padding: padding of the random warps ("border" hides the image frame, so
            the STN cannot read A off black corners that real pose changes do not have).
        val_fraction: share of images held out for validation, never trained on.
        patience: stop after this many epochs without a better validation loss.
        centre: after training, set the STN's centring transform so that the mean pose it
            predicts over all the given images is the identity. Without it, an STN trained
            on aligned images learns a constant warp of its own (measured on synth fabric:
            a 3.7% zoom-in, which alone changed PaDiM's image AUROC from 0.930 to 0.996,
            a resampling effect, not alignment); with it, aligned images stay where they are.
        seed: seeds the split, the shuffling and the random transforms (the STN's initial
            weights are seeded where it is built: STN(seed=...)).
        progress: show a tqdm bar with the loss and the validation MS-SSIM.

    Returns:
        history dict: train_loss, val_loss, val_msssim (lists per epoch), best_epoch,
        epochs_run, seconds, train_indices, val_indices, centring (the mean pose removed:
        rotation_deg, log_scale, translation; None without `centre`), and val_alignment
        (the measure_alignment result of the final weights on the validation split).
    """
    _check_args(stn, objective, samples_per_epoch, batch_size, lr, alpha, beta, gamma,
                val_fraction, patience, augment_padding)
    epochs = DEFAULT_EPOCHS[objective] if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1; got {epochs}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 16):
        raise ValueError(f"image_size must be None or an integer >= 16; got {image_size!r}")
    ranges = _ranges(objective, rotation, translation, scale)
    data = torch.cat([as_float(b) for b in iter_batches(images, 64, size=image_size)])
    if data.shape[0] < 2:
        raise InputError("train_stn needs at least 2 images (1 for validation); "
                         f"got {data.shape[0]}")
    device = next(stn.parameters()).device
    data = data.to(device)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.shape[0], generator=gen)
    n_val = min(data.shape[0] - 1, max(1, round(data.shape[0] * val_fraction)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    train, val = data[train_idx], data[val_idx]
    step = _Step(objective, ranges, alpha, beta, gamma, augment_padding)
    train_poses = val_poses = None
    if objective == "canonical":
        train_poses, template = congeal(train)
        val_poses = register(val, template)
    val_views = step.views(val, torch.Generator().manual_seed(seed + 1))

    optimizer = torch.optim.Adam(stn.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    history = {"train_loss": [], "val_loss": [], "val_msssim": [], "best_epoch": -1,
               "train_indices": train_idx.tolist(), "val_indices": val_idx.tolist()}
    best, best_state, stale = math.inf, copy.deepcopy(stn.state_dict()), 0
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"STN {objective}", disable=not progress, leave=False)
    for epoch in bar:
        stn.train()
        total, count = 0.0, 0
        for index in _epoch_batches(train.shape[0], samples_per_epoch, batch_size, gen):
            x = train[index]
            poses = None if train_poses is None else train_poses[index]
            loss, _ = step.loss(stn, x, step.views(x, gen), poses, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * x.shape[0], count + x.shape[0]
        scheduler.step()
        val_loss, val_score = _evaluate(stn, step, val, val_views, val_poses, batch_size)
        history["train_loss"].append(total / count)
        history["val_loss"].append(val_loss)
        history["val_msssim"].append(val_score)
        bar.set_postfix(loss=f"{total / count:.4f}", val_loss=f"{val_loss:.4f}",
                        val_msssim=f"{val_score:.3f}")
        if val_loss < best - 1e-6:
            best, best_state, stale = val_loss, copy.deepcopy(stn.state_dict()), 0
            history["best_epoch"] = epoch
        else:
            stale += 1
            if stale >= patience:
                break
    stn.load_state_dict(best_state)
    stn.eval()
    history["centring"] = _centre(stn, data, batch_size) if centre else None
    history["epochs_run"] = len(history["train_loss"])
    history["seconds"] = time.perf_counter() - start
    history["val_alignment"] = measure_alignment(stn, val, objective, seed=seed + 2,
                                                 augment_padding=augment_padding, **ranges)
    return history


@torch.no_grad()
def _centre(stn: STN, images: torch.Tensor, batch_size: int) -> dict:
    """Sets stn.centring so that its mean pose over `images` is the identity; returns the
    mean pose that was removed (rotation_deg, log_scale, translation [2])."""
    stn.centring.copy_(identity_theta(1, stn.centring.device))
    theta = torch.cat([stn.predict_theta(x) for x in images.split(batch_size)])
    aspect = images.shape[-1] / images.shape[-2]
    stn.centring.copy_(centring_theta(theta, aspect))
    pose = theta_pose(invert_theta(stn.centring), aspect)
    return {"rotation_deg": pose["rotation_deg"].item(), "log_scale": pose["log_scale"].item(),
            "translation": pose["translation"][0].tolist()}


def _epoch_batches(n: int, samples: int, batch_size: int, gen: torch.Generator):
    """Index batches covering `samples` draws, each pass over the n images reshuffled."""
    passes = -(-samples // n)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(passes)])[:samples]
    return order.split(batch_size)


class _Step:
    """One objective's random views and loss, shared by training and validation."""

    def __init__(self, objective, ranges, alpha, beta, gamma, padding):
        self.objective, self.ranges, self.padding = objective, ranges, padding
        self.alpha, self.beta, self.gamma = alpha, beta, gamma

    def views(self, x: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        """Random transforms [N, 2, 3]: one per image (reconstruct) or two (canonical)."""
        aspect = x.shape[-1] / x.shape[-2]
        n_views = 1 if self.objective == "reconstruct" else 2
        return [random_similarity(x.shape[0], generator=gen, aspect=aspect, device=x.device,
                                  **self.ranges) for _ in range(n_views)]

    def loss(self, stn: STN, x: torch.Tensor, views: list[torch.Tensor],
             poses: torch.Tensor | None = None, gen: torch.Generator | None = None):
        """(loss scalar, per-image MS-SSIM [B]) for images x [B, 3, H, W], their views
        (list of [B, 2, 3]) and, for canonical, their pseudo-poses [B, 2, 3]. In training
        mode the STN sees perturbed views (see _perturb); the loss uses the clean ones."""
        ones = x.new_ones(x.shape[0], 1, *x.shape[-2:])
        eye = identity_theta(x.shape[0], x.device)
        warped = [affine_sample(x, a, padding_mode=self.padding) for a in views]
        seen = torch.cat(warped)
        if stn.training:
            seen = _perturb(seen, gen)
        thetas = stn.predict_theta(seen).split(x.shape[0])
        outputs = [affine_sample(w, t) for w, t in zip(warped, thetas, strict=True)]
        # Valid where theta's sample lands inside the view and A's inside the original.
        masks = [affine_sample(affine_sample(ones, a), t).detach() for a, t in zip(views, thetas, strict=True)]
        frames = [compose(a, t) for a, t in zip(views, thetas, strict=True)]
        if self.objective == "reconstruct":
            image, score = photometric_loss(outputs[0], x, masks[0], self.alpha, self.beta)
            return image + self.gamma * pose_loss(frames[0], eye), score
        image, score = photometric_loss(outputs[0], outputs[1], masks[0] * masks[1],
                                        self.alpha, self.beta)
        # Compared in the output frame: comparing C1 with C2 directly would reward
        # shrinking both, i.e. zooming in.
        pose = pose_loss(compose(invert_theta(frames[0]), frames[1]), eye)
        inverse = invert_theta(poses)
        pose = pose + sum(pose_loss(compose(inverse, f), eye) for f in frames) / 2
        return image + self.gamma * pose, score


def _perturb(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What the localization net sees in training: per-image brightness and contrast
    jitter, and a box (10-30% of the side) pasted from another image of the batch, so the
    pose it predicts ignores lighting and small local changes such as defects."""
    n, _, h, w = x.shape
    u = torch.rand(n, 5, generator=gen).to(x.device)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * (0.8 + 0.4 * u[:, 0, None, None, None]) + mean
         * (0.9 + 0.2 * u[:, 1, None, None, None])).clamp(0, 1)
    side = (0.1 + 0.2 * u[:, 2]) * min(h, w)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    top, left = (u[:, 3] * (h - side))[:, None, None], (u[:, 4] * (w - side))[:, None, None]
    box = ((ys >= top) & (ys < top + side[:, None, None]) & (xs >= left)
           & (xs < left + side[:, None, None]))[:, None]
    donor = x[torch.randperm(n, generator=gen).to(x.device)]
    return torch.where(box, donor, x)


@torch.no_grad()
def _evaluate(stn, step, images, views, poses, batch_size) -> tuple[float, float]:
    stn.eval()
    total, scores = 0.0, []
    for i in range(0, images.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        loss, score = step.loss(stn, images[sl], [v[sl] for v in views],
                                None if poses is None else poses[sl])
        total += loss.item() * score.shape[0]
        scores.append(score)
    return total / images.shape[0], torch.cat(scores).mean().item()


@torch.no_grad()
def measure_alignment(stn: STN, images, objective: str = "reconstruct", rotation: float = 30.0,
                      translation: float = 0.1, scale: float = 1.0, seed: int = 0,
                      augment_padding: str = "border", batch_size: int = 32) -> dict:
    """Alignment error of `stn` on (held-out) images under known random transforms.

    reconstruct: each image x is warped by a random A; a perfect STN predicts A^-1, so the
    residual A @ theta is the identity. canonical: two random views of x; a perfect STN
    gives both the same canonical frame, so (A1 theta1)^-1 (A2 theta2) is the identity.
    Errors are read off the residual: |angle| in degrees and the displacement of the
    image centre in pixels of the images as given.

    Args:
        stn: the STN (evaluated in eval mode, no grad).
        images: tensor [N, 3, H, W] in [0, 1] or anything iter_batches accepts.
        objective: "reconstruct" or "canonical".
        rotation, translation, scale: ranges of the random transforms (as in train_stn).
        seed: seeds the transforms.
        augment_padding: padding of the random warps.
        batch_size: images per forward pass.

    Returns:
        dict: rotation_deg (mean absolute), rotation_deg_max, translation_px (mean),
        translation_px_max, n_images, image_size [H, W].
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}")
    stn.eval()
    device = next(stn.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    n_views = 1 if objective == "reconstruct" else 2
    rot, shift, size = [], [], None
    for x in iter_batches(images, batch_size):
        x = as_float(x, device)
        size = list(x.shape[-2:])
        aspect = x.shape[-1] / x.shape[-2]
        views = [random_similarity(x.shape[0], rotation, translation, scale, gen, aspect, device)
                 for _ in range(n_views)]
        frames = [compose(a, stn.predict_theta(affine_sample(x, a, padding_mode=augment_padding)))
                  for a in views]
        residual = frames[0] if objective == "reconstruct" else compose(invert_theta(frames[0]),
                                                                         frames[1])
        rot.append(theta_pose(residual, aspect)["rotation_deg"].abs())
        half = residual.new_tensor([x.shape[-1] / 2, x.shape[-2] / 2])
        shift.append((residual[:, :, 2] * half).norm(dim=-1))
    rot, shift = torch.cat(rot), torch.cat(shift)
    return {"rotation_deg": rot.mean().item(), "rotation_deg_max": rot.max().item(),
            "translation_px": shift.mean().item(), "translation_px_max": shift.max().item(),
            "n_images": rot.shape[0], "image_size": size}


def _ranges(objective, rotation, translation, scale) -> dict:
    given = {"rotation": rotation, "translation": translation, "scale": scale}
    ranges = {k: float(DEFAULT_RANGES[objective][k] if v is None else v) for k, v in given.items()}
    random_similarity(1, **ranges)  # validates them now, before any data is read
    return ranges


def _check_args(stn, objective, samples_per_epoch, batch_size, lr, alpha, beta, gamma,
                val_fraction, patience, augment_padding):
    if not isinstance(stn, STN):
        raise TypeError(f"stn must be an STN; got {type(stn).__name__}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}")
    if min(samples_per_epoch, batch_size, patience) < 1:
        raise ValueError(f"samples_per_epoch, batch_size and patience must be >= 1; got "
                         f"samples_per_epoch={samples_per_epoch}, batch_size={batch_size}, "
                         f"patience={patience}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    if min(alpha, beta, gamma) < 0:
        raise ValueError(f"loss weights must be >= 0; got alpha={alpha}, beta={beta}, "
                         f"gamma={gamma}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    if augment_padding not in ("zeros", "border", "reflection"):
        raise ValueError("augment_padding must be 'zeros', 'border' or 'reflection'; "
                         f"got {augment_padding!r}")
