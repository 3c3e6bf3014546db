"""Conformal calibration: an image threshold from good images only, with a guarantee.

Score n good images the model never saw while fitting (held out from the training folder,
or a separate folder). For a target false-reject rate alpha, the threshold is the k-th
smallest of those scores with k = ceil((n + 1)(1 - alpha)). If good images are exchangeable
(the held-out ones and those seen later come from one process), a new good image scores
above it with probability at most 1 - k / (n + 1) <= alpha (split conformal prediction,
Vovk et al. 2005; Angelopoulos & Bates, arXiv:2107.07511), and at least that minus
1 / (n + 1) when scores do not tie. When n < 1 / alpha - 1 no k <= n exists: the largest
score is used and the rate it guarantees, 1 / (n + 1), is reported instead.

The image score is the max of the anomaly map, so the same threshold marks the defect
region: pixels whose map value exceeds it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ...errors import InputError
from .validate import check_pose_ranges

# Held-out share of the training images, and the count aimed for when the folder has enough.
HOLDOUT_FRACTION = 0.1
HOLDOUT_MINIMUM = 20
# Held-out score quantiles kept in the model file (a record of the good-score spread).
QUANTILE_LEVELS = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


@dataclass(frozen=True)
class Calibration:
    """A calibrated image/pixel threshold and how it was obtained.

    Attributes:
        threshold: raw anomaly score above which an image (or pixel) is anomalous.
        alpha: the false-reject rate asked for.
        n: number of good calibration images.
        guaranteed_rate: the false-reject rate the threshold guarantees, 1 - k / (n + 1):
            <= alpha, or 1 / (n + 1) > alpha when n is too small for alpha.
        quantiles: [[level, score], ...] of the calibration scores (QUANTILE_LEVELS).
        pose_ranges: None when the calibration images were scored in their own poses; else
            the ranges ({"rotation", "translation", "scale"}) of the random poses they were
            turned into first: the guarantee holds for good parts posed within them.
    """

    threshold: float
    alpha: float
    n: int
    guaranteed_rate: float
    quantiles: list
    pose_ranges: dict | None = None

    @property
    def note(self) -> str | None:
        """One line when n is too small for alpha (None otherwise)."""
        if self.guaranteed_rate <= self.alpha:
            return None
        return (f"{self.n} calibration images cannot support a false-reject rate of {self.alpha:g}: "
                f"the threshold is their largest score, which guarantees {self.guaranteed_rate:.3g} "
                f"(the smallest rate {self.n} images support); {min_images(self.alpha)} images "
                f"are needed for {self.alpha:g}")

    def to_config(self) -> dict:
        """JSON-serialisable form (stored in the model file's config)."""
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> "Calibration":
        """Inverse of to_config; KeyError/TypeError/ValueError on a damaged entry. Entries
        written before pose_ranges existed load with pose_ranges None."""
        required = set(cls.__dataclass_fields__) - {"pose_ranges"}
        if not isinstance(config, dict) or not required <= set(config) <= set(cls.__dataclass_fields__):
            raise ValueError(f"config 'calibration' must hold {sorted(cls.__dataclass_fields__)}")
        pose_ranges = config.get("pose_ranges")
        if pose_ranges is not None:
            check_pose_ranges(pose_ranges, "calibration.pose_ranges")
        calibration = cls(threshold=float(config["threshold"]), alpha=float(config["alpha"]),
                          n=int(config["n"]), guaranteed_rate=float(config["guaranteed_rate"]),
                          quantiles=[[float(q), float(v)] for q, v in config["quantiles"]],
                          pose_ranges=None if pose_ranges is None else dict(pose_ranges))
        if not (0 < calibration.threshold < math.inf and calibration.n >= 1
                and 0 < calibration.alpha < 1 and 0 < calibration.guaranteed_rate < 1):
            raise ValueError(f"config 'calibration' out of range: threshold {calibration.threshold}, "
                             f"alpha {calibration.alpha}, n {calibration.n}, "
                             f"guaranteed_rate {calibration.guaranteed_rate}")
        return calibration


def check_alpha(alpha: float) -> float:
    """alpha as a float in (0, 1), or an InputError naming it."""
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise InputError(f"false_reject_rate must be a number in (0, 1); got {alpha!r}") from None
    if not 0.0 < alpha < 1.0:
        raise InputError(f"false_reject_rate must be in (0, 1); got {alpha}")
    return alpha


def min_images(alpha: float) -> int:
    """Smallest n whose conformal rank k = ceil((n + 1)(1 - alpha)) is <= n."""
    return max(1, math.ceil(1.0 / alpha - 1.0 - 1e-9))


def conformal_calibration(scores: torch.Tensor, alpha: float, pose_ranges: dict | None = None) -> Calibration:
    """The conformal threshold of good-image scores for a target false-reject rate.

    Args:
        scores: [n] image scores of good images not used to fit the model, n >= 1.
        alpha: target false-reject rate, in (0, 1).
        pose_ranges: the random poses the images were scored in, if any (kept as a record).

    Returns:
        Calibration with threshold = k-th smallest score, k = min(n, ceil((n + 1)(1 - alpha))).
    """
    alpha = check_alpha(alpha)
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    n = scores.numel()
    if n == 0:
        raise InputError("calibration needs at least one good image")
    if not torch.isfinite(scores).all():
        raise InputError("calibration scores contain NaN or infinite values")
    # The 1e-9 keeps (n + 1)(1 - alpha) = 19.000000000000004 from becoming rank 20.
    k = min(n, math.ceil((n + 1) * (1.0 - alpha) - 1e-9))
    ordered = scores.sort().values
    levels = torch.tensor(QUANTILE_LEVELS, dtype=torch.float64)
    quantiles = torch.quantile(ordered, levels)
    return Calibration(threshold=float(ordered[k - 1]), alpha=alpha, n=n,
                       guaranteed_rate=(n + 1 - k) / (n + 1),
                       quantiles=[[float(q), float(v)] for q, v in zip(levels, quantiles, strict=True)],
                       pose_ranges=None if pose_ranges is None else dict(pose_ranges))


def holdout_size(n_images: int, fraction: float = HOLDOUT_FRACTION, minimum: int = HOLDOUT_MINIMUM) -> int:
    """Images to hold out of n_images for calibration.

    `fraction` of them, raised to `minimum` as long as three quarters stay for the
    Gaussians; at least one held out and two kept (a covariance needs two) when
    n_images >= 3, none below.
    """
    if n_images < 3:
        return 0
    size = max(math.ceil(fraction * n_images), min(minimum, n_images // 4))
    return min(max(size, 1), n_images - 2)


def split_holdout(paths: list, seed: int, fraction: float = HOLDOUT_FRACTION,
                  minimum: int = HOLDOUT_MINIMUM) -> tuple[list, list]:
    """Seeded random split of training images into (fit, held out), each in input order.

    The same paths and seed give the same split on every run and machine.
    """
    paths = list(paths)
    size = holdout_size(len(paths), fraction, minimum)
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:size])
    return ([p for i, p in enumerate(paths) if i not in held],
            [p for i, p in enumerate(paths) if i in held])


@dataclass
class Decisions:
    """Scores and accept/reject decisions for N images (what `PaDiM.decide` returns).

    Unpacks like `predict`'s result: `scores, maps = model.decide(images)`.

    Attributes:
        scores: [N] raw image scores (max of each map), float32.
        maps: [N, H, W] anomaly maps in the input frame, float32.
        threshold: the calibrated threshold, or None for an uncalibrated model.
        normalized_scores: [N] scores / threshold (1.0 is the boundary), or None.
        anomalous: [N] bool, normalized_scores > 1, or None.
        masks: [N, H, W] bool defect regions, maps > threshold, or None.
    """

    scores: torch.Tensor
    maps: torch.Tensor
    threshold: float | None = None
    normalized_scores: torch.Tensor | None = None
    anomalous: torch.Tensor | None = None
    masks: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.scores, self.maps))


def decide(scores: torch.Tensor, maps: torch.Tensor, threshold: float | None) -> Decisions:
    """Decisions for scores [N] and maps [N, H, W] at `threshold` (None: scores and maps only)."""
    if threshold is None:
        return Decisions(scores, maps)
    return Decisions(scores, maps, threshold, normalized_scores=scores / threshold,
                     anomalous=scores > threshold, masks=maps > threshold)
