"""Feeding a model's results into the HTML report (`--report DIR` of eval and score)."""
from __future__ import annotations

import torch

from ..data.images import iter_batches, resize
from ..models.padim import PaDiM
from ..report_html import HtmlReport, thumb_size
from .experiment import Predictions


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
