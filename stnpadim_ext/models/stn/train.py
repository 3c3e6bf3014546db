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

Training can fail without any error: a run whose localization net never leaves the
identity (measured: one of six short-budget runs on synth part_drift, flat validation
loss, 14.8 deg error). So every run is checked on held-out views: the STN must undo known
perturbations clearly better than not warping at all (measure_alignment's error_ratio at
most MAX_ERROR_RATIO), else it is retrained from the next seed of the same seed sequence
with twice the epochs, up to `retries` times, and then fails loudly (WeakSTNError) unless
a weak STN is explicitly accepted.
"""
from __future__ import annotations

import copy
import math
import time
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from ..._threads import limit_threads
from ...data.images import as_float, iter_batches
from ...errors import InputError, WeakSTNError
from ...ops.affine_sample import affine_sample
from .losses import photometric_loss, pose_loss
from .network import STN
from .register import congeal, register
from .transforms import (
    centring_theta,
    compose,
    identity_theta,
    invert_theta,
    random_similarity,
    similarity_theta,
    theta_pose,
)

OBJECTIVES = ("reconstruct", "canonical")
# Defaults measured on synth part_drift / part_random (python/stn_ablation.py): reconstruct
# converges in ~20 epochs of 512 views (about 35 s of one CPU core), canonical in ~40
# (about 100 s); the reconstruct range covers the +-30 deg test drift with margin.
DEFAULT_EPOCHS = {"reconstruct": 20, "canonical": 40}
DEFAULT_RANGES = {"reconstruct": {"rotation": 40.0, "translation": 0.15, "scale": 1.1},
                  "canonical": {"rotation": 180.0, "translation": 0.15, "scale": 1.1}}
# The collapse check: on held-out views, the STN's mean displacement error must be at most
# this share of what not warping leaves (a stuck STN measures ~1.0; a converged one on
# synth part_drift 0.05-0.1); else up to RETRIES retrainings, then WeakSTNError.
MAX_ERROR_RATIO = 0.5
RETRIES = 2
# Random views per held-out image in the check (a 20% split of 36 images is only 7 images).
CHECK_VIEWS = 8


@limit_threads()  # a tiny network: one thread is as fast quiet, far faster on a busy CPU
def train_stn(stn: STN, images, objective: str = "reconstruct", epochs: int | None = None,
              samples_per_epoch: int = 512, batch_size: int = 32, lr: float = 2e-3,
              alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
              rotation: float | None = None, translation: float | None = None,
              scale: float | None = None, image_size: int | None = 64,
              augment_padding: str = "border", val_fraction: float = 0.2, patience: int = 8,
              centre: bool = True, seed: int = 0, symmetry: int = 1, retries: int = RETRIES,
              max_error_ratio: float = MAX_ERROR_RATIO, accept_weak: bool = False,
              progress: bool = True) -> dict:
    """Trains `stn` in place, self-supervised, checks it on held-out views and returns its
    training history.

    Args:
        stn: the STN to train (left in eval mode, holding the best validation weights of
            the accepted try, with `stn.record` set: see Returns).
        images: good images: tensor [N, 3, H, W] in [0, 1], paths, a folder, or an iterable
            of batches (see stnpadim_ext.data.iter_batches). All are held in memory.
        objective: "reconstruct" or "canonical" (module docstring).
        epochs: maximum number of epochs of the first try (each retry doubles it); None
            takes DEFAULT_EPOCHS[objective].
        samples_per_epoch: random views drawn per epoch (cycling through the shuffled
            training split), so small data sets still get enough steps per epoch.
        batch_size: images per step.
        lr: Adam learning rate.
        alpha, beta: weights of L2 and (1 - MS-SSIM) beside L1 in the photometric loss.
        gamma: weight of the pose term.
        rotation, translation, scale: ranges of the random transforms (degrees, normalised
            units, scale factor >= 1); None takes DEFAULT_RANGES[objective]. They are the
            STN's declared pose range: calibration perturbs held-out images within them.
        image_size: images are resized to this square size for training (theta is
            resolution-free, and the localization net sees 64 px anyway); None keeps
            their size.
        augment_padding: padding of the random warps ("border" hides the image frame, so
            the STN cannot read A off black corners that real pose changes do not have).
        val_fraction: share of images held out for validation and the collapse check,
            never trained on.
        patience: stop after this many epochs without a better validation loss.
        centre: after training, set the STN's centring transform so that the mean pose it
            predicts over all the given images is the identity. Without it, an STN trained
            on aligned images learns a constant warp of its own (measured on synth fabric:
            a 3.7% zoom-in, which alone changed PaDiM's image AUROC from 0.930 to 0.996,
            a resampling effect, not alignment); with it, aligned images stay where they are.
        seed: seeds the split, the checked views and the first try (its shuffling and
            random transforms; the STN's initial weights are seeded where it is built:
            STN(seed=...)). Retries draw new weights and views from the next seeds of
            np.random.SeedSequence(seed).
        symmetry: the part's rotational symmetry order (2: it looks the same after a half
            turn). The canonical objective's pose terms then accept any of its turns (see
            losses.pose_loss), and the check measures rotations modulo 360 / symmetry degrees.
        retries: how many times a try that fails the check is retrained (0: never).
        max_error_ratio: the check: measure_alignment's error_ratio (the STN's mean
            displacement error over the identity's) must be at most this.
        accept_weak: keep the best try with a warning instead of raising WeakSTNError
            when no try passes the check.
        progress: show a tqdm bar with the loss and the validation MS-SSIM.

    Returns:
        history dict of the accepted try: train_loss, val_loss, val_msssim (lists per
        epoch), best_epoch, epochs_run, seconds (all tries), train_indices, val_indices,
        centring (the mean pose removed: rotation_deg, log_scale, translation; None
        without `centre`), val_alignment (measure_alignment on the held-out split), retries
        (tries beyond the first), accepted_weak, attempts (per try: seed, epochs,
        epochs_run, error_ratio, passed) and record (also set as stn.record: objective,
        ranges, augment_padding, symmetry, alignment, retries, accepted_weak).

    Raises:
        WeakSTNError: no try passed the check and accept_weak is False; the message gives
            the best try's errors against the identity's.
    """
    _check_args(stn, objective, samples_per_epoch, batch_size, lr, alpha, beta, gamma,
                val_fraction, patience, augment_padding, symmetry, retries, max_error_ratio)
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
    data = data.to(next(stn.parameters()).device)
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed))
    n_val = min(data.shape[0] - 1, max(1, round(data.shape[0] * val_fraction)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    split = _Split(data[train_idx], data[val_idx])
    step = _Step(objective, ranges, alpha, beta, gamma, augment_padding, symmetry)
    if objective == "canonical":
        split.train_poses, template = congeal(split.train)
        split.val_poses = register(split.val, template)
    split.val_views = step.views(split.val, torch.Generator().manual_seed(seed + 1))
    check = dict(objective=objective, seed=seed + 2, augment_padding=augment_padding,
                 views_per_image=CHECK_VIEWS, symmetry=symmetry, **ranges)

    start, attempts, best = time.perf_counter(), [], None
    for attempt in range(retries + 1):
        attempt_seed = seed if attempt == 0 else _retry_seed(seed, attempt)
        if attempt:
            stn.reset_parameters(attempt_seed)
        attempt_epochs = epochs * 2 ** attempt
        history = _train_once(stn, step, split, attempt_epochs, samples_per_epoch, batch_size,
                              lr, patience, attempt_seed, progress, f"STN {objective}"
                              + (f" (retry {attempt})" if attempt else ""))
        history["centring"] = _centre(stn, data, batch_size) if centre else None
        alignment = measure_alignment(stn, split.val, **check)
        passed = alignment["error_ratio"] <= max_error_ratio
        attempts.append({"seed": attempt_seed, "epochs": attempt_epochs,
                         "epochs_run": history["epochs_run"],
                         "error_ratio": alignment["error_ratio"], "passed": passed})
        if best is None or alignment["error_ratio"] < best[2]["error_ratio"]:
            best = (copy.deepcopy(stn.state_dict()), history, alignment)
        if passed:
            break
    state, history, alignment = best
    stn.load_state_dict(state)
    stn.eval()
    accepted_weak = not attempts[-1]["passed"]
    if accepted_weak:
        message = _weak_message(objective, alignment, max_error_ratio, attempts)
        if not accept_weak:
            raise WeakSTNError(message)
        warnings.warn(f"{message}; kept as asked (accept_weak)", stacklevel=2)
    record = {"objective": objective, "ranges": ranges, "augment_padding": augment_padding,
              "symmetry": symmetry, "alignment": alignment, "retries": len(attempts) - 1,
              "accepted_weak": accepted_weak}
    stn.record = copy.deepcopy(record)
    history.update(train_indices=train_idx.tolist(), val_indices=val_idx.tolist(),
                   seconds=time.perf_counter() - start, val_alignment=alignment,
                   retries=len(attempts) - 1, accepted_weak=accepted_weak, attempts=attempts,
                   record=record)
    return history


class _Split:
    """The training and held-out images, their views and (canonical) pseudo-poses."""

    def __init__(self, train: torch.Tensor, val: torch.Tensor):
        self.train, self.val = train, val
        self.train_poses = self.val_poses = self.val_views = None


def _train_once(stn, step, split, epochs, samples_per_epoch, batch_size, lr, patience, seed,
                progress, desc) -> dict:
    """One try: Adam with cosine decay and early stopping on the validation loss; leaves
    the best validation weights in `stn` (eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(stn.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    history = {"train_loss": [], "val_loss": [], "val_msssim": [], "best_epoch": -1}
    best, best_state, stale = math.inf, copy.deepcopy(stn.state_dict()), 0
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        stn.train()
        total, count = 0.0, 0
        for index in _epoch_batches(split.train.shape[0], samples_per_epoch, batch_size, gen):
            x = split.train[index]
            poses = None if split.train_poses is None else split.train_poses[index]
            loss, _ = step.loss(stn, x, step.views(x, gen), poses, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * x.shape[0], count + x.shape[0]
        scheduler.step()
        val_loss, val_score = _evaluate(stn, step, split, batch_size)
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
    history["epochs_run"] = len(history["train_loss"])
    return history


def _retry_seed(seed: int, attempt: int) -> int:
    """The seed of retry `attempt` (>= 1): the attempt-th child of SeedSequence(seed)."""
    child = np.random.SeedSequence(seed).spawn(attempt)[-1]
    return int(child.generate_state(1)[0])


def _weak_message(objective, alignment, max_ratio, attempts) -> str:
    return (f"the {objective} STN did not learn to align: on held-out views it is off by "
            f"{alignment['rotation_deg']:.1f} deg / {alignment['translation_px']:.1f} px "
            f"(mean displacement {alignment['displacement_px']:.1f} px) where not warping is "
            f"off by {alignment['identity_rotation_deg']:.1f} deg / "
            f"{alignment['identity_translation_px']:.1f} px "
            f"({alignment['identity_displacement_px']:.1f} px): error ratio "
            f"{alignment['error_ratio']:.2f} > {max_ratio:g} after {len(attempts)} tries "
            f"(seeds {', '.join(str(a['seed']) for a in attempts)}; epochs "
            f"{', '.join(str(a['epochs']) for a in attempts)}); train longer, check the "
            "training images, or accept a weak STN explicitly (--accept-weak-stn, "
            "accept_weak=True)")


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

    def __init__(self, objective, ranges, alpha, beta, gamma, padding, symmetry=1):
        self.objective, self.ranges, self.padding = objective, ranges, padding
        self.alpha, self.beta, self.gamma, self.symmetry = alpha, beta, gamma, symmetry

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
        # shrinking both, i.e. zooming in. A symmetric part's frame is right up to its turns.
        turns = None
        if self.symmetry > 1:
            angles = torch.arange(self.symmetry, device=x.device, dtype=x.dtype) * (2 * math.pi / self.symmetry)
            turns = similarity_theta(angles, x.new_zeros(self.symmetry, 2), x.new_zeros(self.symmetry),
                                     x.shape[-1] / x.shape[-2])
        pose = pose_loss(compose(invert_theta(frames[0]), frames[1]), eye, turns)
        inverse = invert_theta(poses)
        pose = pose + sum(pose_loss(compose(inverse, f), eye, turns) for f in frames) / 2
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
def _evaluate(stn, step, split, batch_size) -> tuple[float, float]:
    stn.eval()
    total, scores = 0.0, []
    for i in range(0, split.val.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        loss, score = step.loss(stn, split.val[sl], [v[sl] for v in split.val_views],
                                None if split.val_poses is None else split.val_poses[sl])
        total += loss.item() * score.shape[0]
        scores.append(score)
    return total / split.val.shape[0], torch.cat(scores).mean().item()


@torch.no_grad()
def measure_alignment(stn: STN, images, objective: str = "reconstruct", rotation: float = 30.0,
                      translation: float = 0.1, scale: float = 1.0, seed: int = 0,
                      augment_padding: str = "border", batch_size: int = 32,
                      views_per_image: int = 1, symmetry: int = 1) -> dict:
    """Alignment error of `stn` on (held-out) images under known random transforms, beside
    the error of not warping at all (the identity).

    reconstruct: each image x is warped by a random A; a perfect STN predicts A^-1, so the
    residual A @ theta is the identity (the identity's residual is A itself). canonical: two
    random views of x; a perfect STN gives both the same canonical frame, so
    (A1 theta1)^-1 (A2 theta2) is the identity (the identity's: A1^-1 A2). Errors are read
    off the residual, after removing the nearest multiple of 360 / symmetry degrees of
    rotation: |angle| in degrees, the displacement of the image centre, and the mean
    displacement of the image's pixels, in pixels of the images as given.

    Args:
        stn: the STN (evaluated in eval mode, no grad).
        images: tensor [N, 3, H, W] in [0, 1] or anything iter_batches accepts.
        objective: "reconstruct" or "canonical".
        rotation, translation, scale: ranges of the random transforms (as in train_stn).
        seed: seeds the transforms.
        augment_padding: padding of the random warps.
        batch_size: images per forward pass.
        views_per_image: random views (reconstruct) or view pairs (canonical) per image.
        symmetry: rotational symmetry order of the part (1: none).

    Returns:
        dict: rotation_deg (mean absolute), rotation_deg_max, translation_px (mean),
        translation_px_max, displacement_px (mean), the identity's identity_rotation_deg,
        identity_translation_px and identity_displacement_px, error_ratio
        (displacement_px / identity_displacement_px: ~1 for an STN that does nothing),
        n_images, n_views, image_size [H, W].
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}")
    stn.eval()
    device = next(stn.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    n_views = 1 if objective == "reconstruct" else 2
    errors, n_images, size = {"stn": [], "identity": []}, 0, None
    for x in iter_batches(images, batch_size):
        x = as_float(x, device)
        n_images, size = n_images + x.shape[0], list(x.shape[-2:])
        aspect = x.shape[-1] / x.shape[-2]
        for _ in range(views_per_image):
            views = [random_similarity(x.shape[0], rotation, translation, scale, gen, aspect, device)
                     for _ in range(n_views)]
            frames = [compose(a, stn.predict_theta(affine_sample(x, a, padding_mode=augment_padding)))
                      for a in views]
            for name, found in (("stn", frames), ("identity", views)):
                residual = found[0] if objective == "reconstruct" else compose(
                    invert_theta(found[0]), found[1])
                errors[name].append(_residual_errors(residual, symmetry, size))
    stn_errors, identity = ({k: torch.cat([e[k] for e in errors[name]]) for k in errors[name][0]}
                            for name in ("stn", "identity"))
    displacement = stn_errors["displacement"].mean().item()
    identity_displacement = identity["displacement"].mean().item()
    return {"rotation_deg": stn_errors["rotation"].mean().item(),
            "rotation_deg_max": stn_errors["rotation"].max().item(),
            "translation_px": stn_errors["translation"].mean().item(),
            "translation_px_max": stn_errors["translation"].max().item(),
            "displacement_px": displacement,
            "identity_rotation_deg": identity["rotation"].mean().item(),
            "identity_translation_px": identity["translation"].mean().item(),
            "identity_displacement_px": identity_displacement,
            "error_ratio": displacement / max(identity_displacement, 1e-6),
            "n_images": n_images, "n_views": stn_errors["rotation"].shape[0], "image_size": size}


def _residual_errors(residual: torch.Tensor, symmetry: int, size) -> dict[str, torch.Tensor]:
    """|rotation| (degrees), centre shift and mean pixel displacement (pixels) of residual
    transforms [B, 2, 3] on an image of `size` (H, W), modulo a 360 / symmetry turn."""
    height, width = size
    aspect = width / height
    if symmetry > 1:  # take off the nearest symmetry turn (about the canonical centre)
        step = 2 * math.pi / symmetry
        angle = torch.deg2rad(theta_pose(residual, aspect)["rotation_deg"])
        turn = -torch.round(angle / step) * step
        zero = residual.new_zeros(residual.shape[0])
        residual = compose(residual, similarity_theta(turn, residual.new_zeros(residual.shape[0], 2),
                                                      zero, aspect))
    half = residual.new_tensor([width / 2, height / 2])
    # Pixel centres of an 8 x 8 grid over the image, in normalised coordinates.
    ticks = (torch.arange(8, dtype=residual.dtype, device=residual.device) + 0.5) / 4 - 1
    points = torch.stack(torch.meshgrid(ticks, ticks, indexing="xy"), -1).reshape(-1, 2)
    moved = points @ residual[:, :, :2].transpose(1, 2) + residual[:, None, :, 2]
    return {"rotation": theta_pose(residual, aspect)["rotation_deg"].abs(),
            "translation": (residual[:, :, 2] * half).norm(dim=-1),
            "displacement": ((moved - points) * half).norm(dim=-1).mean(1)}


def _ranges(objective, rotation, translation, scale) -> dict:
    given = {"rotation": rotation, "translation": translation, "scale": scale}
    ranges = {k: float(DEFAULT_RANGES[objective][k] if v is None else v) for k, v in given.items()}
    random_similarity(1, **ranges)  # validates them now, before any data is read
    return ranges


def _check_args(stn, objective, samples_per_epoch, batch_size, lr, alpha, beta, gamma,
                val_fraction, patience, augment_padding, symmetry, retries, max_error_ratio):
    if not isinstance(stn, STN):
        raise TypeError(f"stn must be an STN; got {type(stn).__name__}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}")
    if min(samples_per_epoch, batch_size, patience, symmetry) < 1 or retries < 0:
        raise ValueError(f"samples_per_epoch, batch_size, patience and symmetry must be >= 1 and "
                         f"retries >= 0; got samples_per_epoch={samples_per_epoch}, "
                         f"batch_size={batch_size}, patience={patience}, symmetry={symmetry}, "
                         f"retries={retries}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    if min(alpha, beta, gamma) < 0:
        raise ValueError(f"loss weights must be >= 0; got alpha={alpha}, beta={beta}, "
                         f"gamma={gamma}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    if not max_error_ratio > 0:
        raise ValueError(f"max_error_ratio must be > 0; got {max_error_ratio}")
    if augment_padding not in ("zeros", "border", "reflection"):
        raise ValueError("augment_padding must be 'zeros', 'border' or 'reflection'; "
                         f"got {augment_padding!r}")
