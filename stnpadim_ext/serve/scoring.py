"""The model side of the service: one loaded model, the same steps as `stnpadim score`.

An upload goes through the file pipeline's decoder (`decode_image` on the bytes: the same
format allow-list, pixel limit, NaN check and shrink-on-decode, straight to the model's
image size), batches are stacked as the pipeline stacks them (`assemble`) and scored by
`predict_batch`, and heatmaps and masks are drawn by `score`'s own `heatmap_overlay` from
maps kept in half precision as `score` keeps them, so the answers equal `score`'s.
"""
from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import torch

from ..catalog import HEATMAP_MAX_SIDE
from ..data.images import assemble, decode_image, load_image
from ..models.padim import PaDiM, load
from ..report import encode_png, heat_range, heatmap_overlay

# How error messages name an upload ("request body: not a readable image (...)").
BODY = "request body"


class Scorer:
    """A loaded model as the service uses it.

    Args:
        model: a fitted PaDiM.
        path: the model file it was read from.
        sha256: hex digest of that file.
    """

    def __init__(self, model: PaDiM, path: str | os.PathLike, sha256: str):
        self.model, self.path, self.sha256 = model, Path(path), sha256
        self.name = f"{self.path.name}@{sha256[:12]}"  # names file and version in every answer

    @classmethod
    def load(cls, path: str | os.PathLike, device=None) -> "Scorer":
        """Reads a model file (InputError when it is missing or damaged) and warms it up."""
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            pass  # `load` names the problem in its own words
        scorer = cls(load(path, device=device, progress=False), path, digest.hexdigest())
        scorer.run_batch([scorer.decode_blank()])  # first-call set-up before the first request
        return scorer

    @property
    def threshold(self) -> float | None:
        return self.model.threshold

    def decode(self, body: bytes) -> tuple[torch.Tensor, tuple[int, int]]:
        """One upload -> (image [3, *image_size], source (H, W)); InputError for bad bytes."""
        return decode_image(body, self.model.image_size, name=BODY)

    def decode_blank(self) -> tuple[torch.Tensor, tuple[int, int]]:
        height, width = self.model.image_size
        return torch.zeros(3, height, width, dtype=torch.uint8), (height, width)

    def run_batch(self, decoded: list[tuple[torch.Tensor, tuple[int, int]]]) -> list[tuple[float, torch.Tensor]]:
        """One model call on decoded uploads -> [(score, map [H, W] float16 on the CPU)].

        Maps are at the model's image size, as `score` computes them (it resizes them to each
        overlay afterwards).
        """
        batch = assemble(decoded, pin=self.model.device.type == "cuda").images
        scores, maps = self.model.predict_batch(batch)
        return list(zip(scores.cpu().tolist(), maps.cpu().half(), strict=True))

    def answer(self, score: float) -> dict:
        """The JSON answer for one score: decisions at the calibrated threshold (None when the
        model is uncalibrated)."""
        threshold = self.threshold
        return {"score": score,
                "normalized_score": None if threshold is None else score / threshold,
                "anomalous": None if threshold is None else score > threshold,
                "threshold": threshold, "model": self.name}

    def render(self, body: bytes, amap: torch.Tensor, heatmap: bool, mask: bool) -> dict:
        """The heatmap overlay and / or mask of one upload, base64 PNGs as `score` writes them.

        The image is decoded again at overlay size (longest side at most HEATMAP_MAX_SIDE);
        an uncalibrated model's colours span the map's own range, as `score` on one file.
        """
        image = load_image(body, max_side=HEATMAP_MAX_SIDE, name=BODY)
        threshold = self.threshold
        vmin, vmax = heat_range(threshold) if threshold else (float(amap.min()), float(amap.max()))
        heat, region = heatmap_overlay(image, amap, threshold, vmin, vmax)
        out = {}
        if heatmap:
            out["heatmap_png"] = _base64_png(heat)
        if mask:
            out["mask_png"] = _base64_png(region.astype("uint8") * 255)
        return out

    def info(self) -> dict:
        """What GET /v1/model shows."""
        model, calibration = self.model, self.model.calibration
        return {"model": self.name, "file": str(self.path), "sha256": self.sha256,
                "backbone": model.backbone_name, "n_features": model.n_features,
                "image_size": list(model.image_size),
                "center_crop": list(model.center_crop) if model.center_crop else None,
                "stn": None if model.stn is None else getattr(model.stn, "config", {}),
                "threshold": self.threshold,
                "false_reject_rate": None if calibration is None else calibration.alpha,
                "guaranteed_false_reject_rate": None if calibration is None else calibration.guaranteed_rate,
                "calibration_images": None if calibration is None else calibration.n,
                "device": str(model.device)}


def _base64_png(pixels) -> str:
    return base64.b64encode(encode_png(pixels)).decode("ascii")
