"""Feeding a model's results into the HTML report (`--report DIR` of eval and score)."""
from __future__ import annotations

import torch

from ..data.images import iter_batches, resize
from ..models.padim import PaDiM
from ..report_html import HtmlReport, thumb_size
from .experiment import Predictions
from .model_options import JSON_KEYS


def aligned_views(model: PaDiM, paths: list) -> torch.Tensor | None:
    """The STN's aligned view of every image at thumbnail size [N, 3, h, w], or None for a
    model without an STN."""
    if model.stn is None:
        return None
    size = thumb_size(model.input_size)
    return torch.cat([resize(model.align(batch), size) for batch in
                      iter_batches(paths, model.batch_size, size=model.image_size)])


def add_predictions(report: HtmlReport, category: str, label: str, model: PaDiM,
                    predictions: Predictions, metrics: dict) -> None:
    """Adds one model's test-set predictions and metrics on `category` to the report."""
    report.add(category, label, predictions.paths, predictions.scores, predictions.maps,
               model.threshold, labels=predictions.labels, defects=predictions.defects,
               masks=predictions.masks, aligned=aligned_views(model, predictions.paths),
               metrics=metrics,
               calibration=None if model.calibration is None else model.calibration.to_config())


def false_reject_warning(arms: dict[str, dict]) -> str | None:
    """One line naming every (category, model) whose false-reject rate on the good test
    images is over twice its calibrated bound (eval's `arms`: {label: summarize(...)}), or
    None when there is none."""
    over = []
    for label, results in arms.items():
        for category, metrics in results["categories"].items():
            rate, bound = metrics.get("false_reject_rate"), metrics.get("false_reject_bound")
            if rate is not None and bound is not None and rate > 2 * bound:
                over.append(f"{category} {label} {rate:.2f} (bound {bound:.3g})")
    if not over:
        return None
    return ("false-reject rate on the good test images over twice its calibrated bound: "
            + ", ".join(over) + "; the bound holds only for images like the calibration images: "
            "calibrate with good images from the line (--calibration DIR, or "
            "CATEGORY/calibration/good)")


def results_document(arms: dict[str, dict]) -> dict:
    """eval --json's document: the STN arm (or the only arm) at the top level, the others
    under their JSON_KEYS."""
    top = next((label for label in arms if label not in JSON_KEYS), next(iter(arms)))
    return {**arms[top], **{JSON_KEYS[label]: results for label, results in arms.items()
                            if label != top}}
