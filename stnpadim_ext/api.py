"""The one-call entry point: scores, anomaly maps and decisions from a model or a model file."""
from __future__ import annotations

import os

from .errors import InputError
from .models.padim import Decisions, PaDiM, load

__all__ = ["score", "load", "Decisions"]


def score(model_or_path: PaDiM | str | os.PathLike, images) -> Decisions:
    """Scores images with a fitted PaDiM, given as an object or a saved model file.

    Example:
        >>> scores, maps = stnpadim_ext.score("bottle.padim", "photos/")   # as before
        >>> result = stnpadim_ext.score("bottle.padim", "photos/")
        >>> result.anomalous, result.normalized_scores, result.masks

    Args:
        model_or_path: a fitted `PaDiM`, or the path of a file written by `PaDiM.save`.
        images: a tensor [B, 3, H, W] in [0, 1], image paths, a folder, or a DataLoader /
            iterable of such tensors.

    Returns:
        `Decisions` (see `PaDiM.decide`): scores [B] and maps [B, H, W] in the images' own
        resolution, float32 on the CPU, and at the model's calibrated threshold
        normalized_scores [B], anomalous [B] and masks [B, H, W] (None for a model saved
        without calibration). Unpacks as (scores, maps), like `PaDiM.predict`.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        model_or_path = load(model_or_path)
    if not isinstance(model_or_path, PaDiM):
        raise InputError(f"score needs a PaDiM model or a model file path; got {type(model_or_path).__name__}")
    return model_or_path.decide(images)
