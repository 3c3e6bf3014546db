"""Fitting and evaluating one model on one category: shared by fit, eval, demo and
python/reproduce_table1.py, so every column of a comparison gets the same pre-processing.

An STN result is always reported beside two controls (`run_arms`): plain PaDiM, and a
"fixed warp": plain PaDiM behind one constant transform, the STN's mean pose over the
training images, with the STN's padding and resampling. The STN's gain is what it adds
over the better of the two; `run_seeds` repeats all three over several seeds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from ..data.images import as_float, describe, iter_batches
from ..data.mvtec import Category, load_mask
from ..errors import InputError
from ..metrics import THRESHOLD_METRICS, aupro, image_auroc, image_f1, pixel_auroc, threshold_metrics
from ..models.padim import PaDiM
from ..models.padim.calibration import split_holdout
from ..models.stn import STN, FixedWarp, mean_pose, train_stn

# Column labels of the three arms, in table order.
PADIM, FIXED_WARP, STN_PADIM = "PaDiM", "fixed warp", "STN+PaDiM"
# Per-run gain of the STN over the better control, for these metrics.
GAIN_METRICS = ("image_auroc", "pixel_auroc")


@dataclass(frozen=True)
class ModelOptions:
    """How a model is built and fitted (the `fit` options of the CLI).

    Attributes:
        backbone: PaDiM backbone name.
        weights: backbone state-dict file, or None for the default weights.
        stn: "reconstruct", "canonical" or "none" (plain PaDiM).
        stn_epochs: maximum STN training epochs, None for train_stn's default.
        image_size: square side images are resized to.
        center_crop: optional centre crop side after the resize.
        n_features: embedding channels, None for the backbone's default.
        seed: seeds the channel subset, the calibration hold-out, the STN's initial weights
            and its training.
        batch_size: images per forward pass.
        device: torch device string, None for the default.
        stn_train: further train_stn keyword arguments (e.g. samples_per_epoch).
        false_reject_rate: target false-reject rate of the calibrated threshold.
    """

    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    stn: str = "reconstruct"
    stn_epochs: int | None = None
    image_size: int = 256
    center_crop: int | None = None
    n_features: int | None = None
    seed: int = 0
    batch_size: int = 32
    device: str | None = None
    stn_train: dict = field(default_factory=dict)
    false_reject_rate: float = 0.01

    @classmethod
    def from_args(cls, args) -> "ModelOptions":
        """Options from parsed CLI arguments: attributes named like the fields; None (not
        given) keeps the default."""
        given = {k: getattr(args, k, None) for k in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in given.items() if v is not None})

    @property
    def label(self) -> str:
        """Column label: "PaDiM" or "STN+PaDiM"."""
        return PADIM if self.stn == "none" else STN_PADIM


@dataclass
class Predictions:
    """A model's output on a category's test set, at the model's image size.

    Attributes:
        paths: test image paths; defects: their defect types; labels: int64 [N].
        scores: float32 [N]; maps: float32 [N, H, W]; masks: bool [N, H, W].
        seconds: model time (alignment, backbone, distances, maps), excluding image reading.
        out_of_view: float32 [N], share of each image's pixels the model did not see.
    """

    paths: list
    defects: list[str]
    labels: torch.Tensor
    scores: torch.Tensor
    maps: torch.Tensor
    masks: torch.Tensor
    seconds: float
    out_of_view: torch.Tensor


def fit_model(train_paths, options: ModelOptions, progress: bool = True,
              calibration_paths=None) -> tuple[PaDiM, dict]:
    """Builds a PaDiM (behind a freshly trained STN unless options.stn is "none"), fits and
    calibrates it.

    The backbone is built first, so missing weights are reported before any training.
    Without calibration_paths a seeded share of train_paths is held out (split_holdout):
    neither the STN nor the Gaussians see it; it only sets the threshold.

    Returns:
        (fitted model, info) with info: fit_seconds (STN training + PaDiM fit +
        calibration) and, with an STN, stn_history (train_stn's history).
    """
    # Border padding: a part aligned from up to 30 degrees off shows no black corners,
    # which PaDiM would score as anomalies (measured on synthetic part_drift, 128 px,
    # efficientnet_lite0: STN+PaDiM image AUROC 0.57 with zeros padding, 0.89 with border).
    if len(train_paths) < 2:  # a covariance (and the STN's validation split) needs two
        raise InputError(f"{describe(train_paths)}: fitting needs at least 2 good images; "
                         f"got {len(train_paths)}")
    stn = None if options.stn == "none" else STN(padding_mode="border", seed=options.seed)
    model = _padim(options, stn, progress)
    info = {}
    start = time.perf_counter()
    if calibration_paths is None:
        train_paths, calibration_paths = split_holdout(train_paths, seed=options.seed)
    if stn is not None:
        kwargs = dict(options.stn_train)
        if options.stn_epochs is not None:
            kwargs["epochs"] = options.stn_epochs
        info["stn_history"] = train_stn(model.stn, train_paths, objective=options.stn,
                                        seed=options.seed, progress=progress, **kwargs)
    model.fit(train_paths)
    if calibration_paths:  # none below 3 training images
        model.calibrate(calibration_paths, options.false_reject_rate)
    info["fit_seconds"] = time.perf_counter() - start
    return model, info


def fixed_warp_model(stn_model: PaDiM, train_paths, options: ModelOptions,
                     progress: bool = True) -> tuple[PaDiM, dict]:
    """The fixed-warp control of a fitted STN+PaDiM: plain PaDiM behind the STN's mean pose
    over its training images (one constant transform), same padding and resampling, fitted
    and calibrated on the same split of train_paths as fit_model's.

    Returns:
        (fitted model, info) with info: fit_seconds (PaDiM fit + calibration) and theta (the
        warp, [2, 3]).
    """
    start = time.perf_counter()
    train_paths, calibration_paths = split_holdout(train_paths, seed=options.seed)
    with torch.no_grad():
        theta = torch.cat([stn_model.stn.predict_theta(as_float(batch.to(stn_model.device)))
                           for batch in iter_batches(train_paths, options.batch_size,
                                                     size=options.image_size)])
    warp = FixedWarp(mean_pose(theta.cpu()), stn_model.stn.config["padding_mode"])
    model = _padim(options, warp, progress).fit(train_paths)
    if calibration_paths:
        model.calibrate(calibration_paths, options.false_reject_rate)
    return model, {"fit_seconds": time.perf_counter() - start, "theta": warp.theta[0].tolist()}


def _padim(options: ModelOptions, stn, progress: bool) -> PaDiM:
    return PaDiM(options.backbone, weights=options.weights, n_features=options.n_features,
                 image_size=options.image_size, stn=stn, device=options.device,
                 center_crop=options.center_crop, batch_size=options.batch_size,
                 seed=options.seed, progress=progress)


def predict_category(model: PaDiM, category: Category, progress: bool = True) -> Predictions:
    """Scores every test image of `category` (images and masks resized to the model's size)."""
    items = category.test_items
    if not items:
        raise InputError(f"{category.path / 'test'}: no test images to evaluate on")
    size = model.image_size
    scores, maps, out_of_view, seconds = [], [], [], 0.0
    paths = [item.path for item in items]
    with tqdm(total=len(paths), desc=f"{category.name}: predict", unit="img",
              disable=not progress, leave=False) as bar:
        for batch in iter_batches(paths, model.batch_size, size=size):
            start = time.perf_counter()
            batch_scores, batch_maps = model.predict_batch(batch)
            batch_scores, batch_maps = batch_scores.cpu(), batch_maps.cpu()
            seconds += time.perf_counter() - start
            scores.append(batch_scores)
            maps.append(batch_maps)
            out_of_view.append(model.out_of_view_fraction(batch))
            bar.update(batch.shape[0])
    masks = torch.stack([torch.zeros(size, dtype=torch.bool) if item.mask_path is None
                         else load_mask(item.mask_path, size) for item in items])
    return Predictions(paths=paths, defects=[item.defect for item in items],
                       labels=torch.tensor([item.label for item in items]),
                       scores=torch.cat(scores), maps=torch.cat(maps), masks=masks,
                       seconds=seconds, out_of_view=torch.cat(out_of_view))


def compute_metrics(predictions: Predictions, crop: tuple[int, int] | None = None) -> dict:
    """image/pixel AUROC, AUPRO and image F1 of `predictions` (None where undefined), and the
    mean out-of-view fraction of its images.

    Args:
        predictions: as returned by predict_category.
        crop: (h, w) of a centre crop the pixel metrics are restricted to (the model's
            center_crop: the pixels the model actually sees).
    """
    labels, scores = predictions.labels.numpy(), predictions.scores.numpy()
    masks, maps = predictions.masks, predictions.maps
    if crop is not None:
        (height, width), (ch, cw) = masks.shape[-2:], crop
        top, left = (height - ch) // 2, (width - cw) // 2
        masks, maps = masks[:, top:top + ch, left:left + cw], maps[:, top:top + ch, left:left + cw]
    both_labels = 0 < labels.sum() < labels.size
    both_pixels = 0 < int(masks.sum()) < masks.numel()
    masks, maps = masks.numpy(), maps.numpy()
    return {
        "image_auroc": float(image_auroc(labels, scores)) if both_labels else None,
        "pixel_auroc": float(pixel_auroc(masks, maps)) if both_pixels else None,
        "aupro": float(aupro(masks, maps)) if both_pixels else None,
        "image_f1": float(image_f1(labels, scores)) if both_labels else None,
        "out_of_view_fraction": float(predictions.out_of_view.mean()),
    }


def run_category(category: Category, options: ModelOptions, progress: bool = True,
                 model: PaDiM | None = None) -> tuple[dict, Predictions, PaDiM]:
    """Fits (unless `model` is given) and evaluates one model on one category.

    Returns:
        (metrics, predictions, model); metrics hold the METRICS keys plus fit_seconds (None
        for a given model), images_per_second (model throughput on the test set) and the
        THRESHOLD_METRICS at the model's calibrated threshold (None when uncalibrated).
    """
    fit_seconds = None
    if model is None:
        model, info = fit_model(category.train_paths, options, progress)
        fit_seconds = info["fit_seconds"]
    predictions = predict_category(model, category, progress)
    metrics = compute_metrics(predictions, model.center_crop)
    metrics["fit_seconds"] = fit_seconds
    metrics["images_per_second"] = len(predictions.paths) / max(predictions.seconds, 1e-9)
    metrics.update(dict.fromkeys(THRESHOLD_METRICS) if model.threshold is None else
                   threshold_metrics(predictions.labels, predictions.scores, model.threshold))
    return metrics, predictions, model


def run_arms(category: Category, options: ModelOptions, progress: bool = True,
             baseline: bool = True) -> tuple[dict[str, dict], dict[str, Predictions], dict[str, PaDiM]]:
    """Fits and evaluates `options` on one category beside its controls.

    Returns:
        ({label: metrics}, {label: predictions}, {label: model}) as run_category gives them:
        for plain PaDiM options just PADIM; with an STN, PADIM, FIXED_WARP and STN_PADIM (the
        controls skipped when `baseline` is False). The STN arm's metrics also hold
        <metric>_gain for GAIN_METRICS: its value minus the better of the two controls'.
    """
    if options.stn == "none":
        metrics, predictions, model = run_category(category, options, progress)
        return {PADIM: metrics}, {PADIM: predictions}, {PADIM: model}
    metrics, predictions, models = {}, {}, {}
    if baseline:
        metrics[PADIM], predictions[PADIM], models[PADIM] = run_category(
            category, replace(options, stn="none"), progress)
    stn_metrics, stn_predictions, stn_model = run_category(category, options, progress)
    if baseline:
        model, info = fixed_warp_model(stn_model, category.train_paths, options, progress)
        metrics[FIXED_WARP], predictions[FIXED_WARP], models[FIXED_WARP] = run_category(
            category, options, progress, model=model)
        metrics[FIXED_WARP]["fit_seconds"] = info["fit_seconds"]
        for name in GAIN_METRICS:
            controls = [metrics[PADIM][name], metrics[FIXED_WARP][name]]
            if stn_metrics[name] is not None and None not in controls:
                stn_metrics[f"{name}_gain"] = stn_metrics[name] - max(controls)
    metrics[STN_PADIM], predictions[STN_PADIM], models[STN_PADIM] = (stn_metrics, stn_predictions,
                                                                     stn_model)
    return metrics, predictions, models
