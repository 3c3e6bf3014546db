"""Fitting and evaluating models on one category: shared by fit, eval, demo and the python/
scripts, so every arm of a comparison gets the same pre-processing.

An STN result is always reported beside what a user would do instead (`run_arms`), each
fitted with the same backbone, channel subset, calibration split and seed:

- PaDiM: plain PaDiM on the training images;
- PaDiM+aug: plain PaDiM on the training images in random poses drawn from the STN's own
  training ranges (pose augmentation);
- STN+PaDiM: the STN, then PaDiM fitted on the same posed views as the STN aligns them;
- oracle, where the data records every image's true pose (`stnpadim synth`'s meta.json):
  PaDiM on the same posed views aligned by their true pose, and test images aligned by
  theirs: a perfect STN, the ceiling of alignment.

The three pose arms fit on the same views (_n_views: as many as the STN's first
try trains on, up to MAX_VIEWS) and are calibrated on the same held-out images in the same
random poses (PaDiM.calibrate with pose_ranges): they differ only in how they align. The
STN's gain is quoted over the better of PaDiM and PaDiM+aug, run by run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..data.images import describe
from ..data.mvtec import Category, load_mask
from ..distributed.shards import share_indices
from ..errors import InputError
from ..metrics import THRESHOLD_METRICS, aupro, image_auroc, image_f1, pixel_auroc, threshold_metrics
from ..models.padim import PaDiM
from ..models.padim.calibration import split_holdout
from ..models.stn import DEFAULT_RANGES, STN, train_stn
from ..models.stn.poses import RANGE_KEYS, posed_batches
from ..models.stn.train import DEFAULT_EPOCHS
from .model_options import AUGMENTED, ORACLE, PADIM, STN_PADIM, ModelOptions

# Per-run gain of the STN over the better non-oracle baseline, for these metrics.
GAIN_METRICS = ("image_auroc", "pixel_auroc")
# Most posed views the pose arms are fitted on: each costs a backbone pass, and PaDiM's
# Gaussians stop changing long before the canonical STN's 10240 training views.
MAX_VIEWS = 4096


@dataclass
class Predictions:
    """A model's output on a category's test set, at the model's image size.

    Attributes:
        paths: test image paths; defects: their defect types; labels: int64 [N].
        scores: float32 [N]; maps: float32 [N, H, W]; masks: bool [N, H, W].
        seconds: model time (alignment, backbone, distances, maps), excluding image reading.
        out_of_view: bool [N, H, W], the pixels the model did not see.
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
    neither the STN nor the Gaussians see it; it only sets the threshold. Behind an STN the
    Gaussians are fitted on _n_views posed views (at least one per image) of the training
    images in random poses of the STN's declared range, as the STN aligns them, and the
    held-out images are scored in such poses too (PaDiM.fit / calibrate with pose_ranges):
    test parts are expected to arrive in any pose of that range. A given calibration folder holds real line images:
    they are scored as they are.

    Returns:
        (fitted model, info) with info: fit_seconds (STN training + PaDiM fit +
        calibration) and, with an STN, stn_history (train_stn's history).
    """
    # Border padding: a part aligned from up to 30 degrees off shows no black corners,
    # which PaDiM would score as anomalies (measured on synthetic part_drift, 128 px,
    # efficientnet_lite0: STN+PaDiM image AUROC 0.57 with zeros padding, 0.89 with border).
    _check_enough(train_paths)
    stn = None if options.stn == "none" else STN(padding_mode="border", seed=options.seed)
    model = _padim(options, stn, progress)
    info = {}
    start = time.perf_counter()
    held_out = calibration_paths is None
    if held_out:
        train_paths, calibration_paths = split_holdout(train_paths, seed=options.seed)
    if stn is not None:
        info["stn_history"] = _train_stn(model.stn, train_paths, options, progress)
    ranges = None if stn is None else model.stn.record["ranges"]
    # Under torchrun every rank fits and calibrates on its share (shard=True; in one
    # process: everything); the split above and the views are drawn alike on every rank.
    model.fit(train_paths, ranges, None if stn is None else _n_views(options, train_paths),
              options.seed, shard=True)
    if calibration_paths:  # none below 3 training images
        model.calibrate(calibration_paths, options.false_reject_rate, ranges if held_out else None,
                        seed=options.seed, shard=True)
    info["fit_seconds"] = time.perf_counter() - start
    return model, info


def _n_views(options: ModelOptions, train_paths) -> int:
    """Posed views a pose arm fits on: options.pose_views, else the STN's first-try budget
    (epochs x samples per epoch) up to MAX_VIEWS; at least one per training image."""
    views = options.pose_views
    if views is None:
        epochs = options.stn_epochs or DEFAULT_EPOCHS[options.stn]
        views = min(MAX_VIEWS, epochs * options.stn_train.get("samples_per_epoch", 512))
    return max(views, len(train_paths))


def pose_ranges(options: ModelOptions) -> dict:
    """The STN's training ranges (rotation, translation, scale): its declared pose range."""
    return {k: float(options.stn_train.get(k, DEFAULT_RANGES[options.stn][k])) for k in RANGE_KEYS}


def _train_stn(stn: STN, train_paths, options: ModelOptions, progress: bool) -> dict:
    """train_stn with the options; under torchrun, rank 0's STN on every rank.

    Every rank trains from the seed, then takes rank 0's weights and record: no rank sits
    in a collective for the length of training (the process-group timeout stays short),
    and on hosts whose CPUs or GPUs round differently (AVX2 vs AVX-512, CPU vs GPU) the
    Gaussians are still all fitted behind one STN. Only rank 0's check can stop the run;
    the other ranks' STNs are replaced anyway.
    """
    kwargs = dict(options.stn_train)
    if options.stn_epochs is not None:
        kwargs["epochs"] = options.stn_epochs
    main = distributed.is_main()
    history = train_stn(stn, train_paths, objective=options.stn, seed=options.seed,
                        symmetry=options.stn_symmetry, accept_weak=options.accept_weak_stn or not main,
                        progress=progress and main, **kwargs)
    if distributed.active():
        state = {k: v.cpu() for k, v in stn.state_dict().items()}
        state, stn.record, history = distributed.broadcast_from_main((state, stn.record, history))
        stn.load_state_dict(state)
    return history


def fit_posed(train_paths, options: ModelOptions, progress: bool = True, poses: dict | None = None,
              calibration_paths=None) -> tuple[PaDiM, dict]:
    """A pose arm without an STN: plain PaDiM fitted on _n_views posed views (at least one per
    image) of the training images in random poses of the STN's ranges (pose_ranges)
    and calibrated like fit_model's STN arm (the held-out images in random poses of the same ranges, or the
    given line images as they are): PaDiM+aug, or with the images' true `poses` ({path:
    theta}) aligning every view and image, the oracle.

    Returns:
        (fitted model, info) with info: fit_seconds.
    """
    _check_enough(train_paths)
    start = time.perf_counter()
    model = _padim(replace(options, stn="none"), None, progress)
    ranges = pose_ranges(options)
    calibration_ranges = None
    if calibration_paths is None:
        train_paths, calibration_paths = split_holdout(train_paths, seed=options.seed)
        calibration_ranges = ranges
    model.fit(train_paths, ranges, _n_views(options, train_paths), options.seed, poses, shard=True)
    if calibration_paths:
        model.calibrate(calibration_paths, options.false_reject_rate, calibration_ranges,
                        options.seed, poses, shard=True)
    return model, {"fit_seconds": time.perf_counter() - start}


def _check_enough(train_paths) -> None:
    if len(train_paths) < 2:  # a covariance (and the STN's validation split) needs two
        raise InputError(f"{describe(train_paths)}: fitting needs at least 2 good images; "
                         f"got {len(train_paths)}")


def _padim(options: ModelOptions, stn, progress: bool) -> PaDiM:
    return PaDiM(options.backbone, weights=options.weights, n_features=options.n_features,
                 image_size=options.image_size, stn=stn, device=options.device,
                 center_crop=options.center_crop, batch_size=options.batch_size,
                 seed=options.seed, progress=progress)


def predict_category(model: PaDiM, category: Category, progress: bool = True,
                     poses: dict | None = None) -> Predictions:
    """Scores every test image of `category` (images and masks resized to the model's size),
    aligned by their known `poses` ({path: theta}, the oracle) when given. Under torchrun
    each rank scores its share and every rank gets all the predictions, in order;
    `seconds` is then the slowest rank's."""
    items = category.test_items
    if not items:
        raise InputError(f"{category.path / 'test'}: no test images to evaluate on")
    size = model.image_size
    scores, maps, unseen, seconds = [], [], [], 0.0
    paths = [item.path for item in items]
    part = distributed.shard()
    with tqdm(total=len(share_indices(len(paths), model.batch_size, part)), desc=f"{category.name}: predict",
              unit="img", disable=not progress, leave=False) as bar:
        for batch, _, pose in posed_batches(paths, batch_size=model.batch_size, size=size, poses=poses,
                                            shard=part):
            start = time.perf_counter()
            batch_scores, batch_maps = model.predict_batch(batch, pose=pose)
            batch_scores, batch_maps = batch_scores.cpu(), batch_maps.cpu()
            seconds += time.perf_counter() - start
            scores.append(batch_scores)
            maps.append(batch_maps)
            unseen.append(model.out_of_view(batch, pose))
            bar.update(batch.shape[0])
    scores, maps, unseen = (torch.cat(parts) if parts else torch.empty(0) for parts in (scores, maps, unseen))
    if distributed.active():
        scores, maps, unseen = (distributed.gather_tensor_in_order(t, model.batch_size)
                                for t in (scores, maps, unseen))
        seconds = distributed.all_reduce_float(seconds, "max")
    masks = torch.stack([torch.zeros(size, dtype=torch.bool) if item.mask_path is None
                         else load_mask(item.mask_path, size) for item in items])
    return Predictions(paths=paths, defects=[item.defect for item in items],
                       labels=torch.tensor([item.label for item in items]),
                       scores=scores, maps=maps, masks=masks, seconds=seconds, out_of_view=unseen)


def compute_metrics(predictions: Predictions, crop: tuple[int, int] | None = None) -> dict:
    """image/pixel AUROC, AUPRO and image F1 of `predictions` (None where undefined), the
    mean out-of-view share of the images' pixels and of their defect pixels (None without
    defects).

    Args:
        predictions: as returned by predict_category.
        crop: (h, w) of a centre crop the pixel metrics are restricted to (the model's
            center_crop: the pixels the model actually sees).
    """
    labels, scores = predictions.labels.numpy(), predictions.scores.numpy()
    masks, maps = predictions.masks, predictions.maps
    defect_pixels = int(masks.sum())
    unseen_defects = (None if defect_pixels == 0 else
                      int((masks & predictions.out_of_view).sum()) / defect_pixels)
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
        "out_of_view_fraction": float(predictions.out_of_view.float().mean()),
        "defect_out_of_view_fraction": unseen_defects,
    }


def run_category(category: Category, options: ModelOptions, progress: bool = True,
                 model: PaDiM | None = None, poses: dict | None = None,
                 calibration_paths=None) -> tuple[dict, Predictions, PaDiM]:
    """Fits (unless `model` is given; calibrated on `calibration_paths` when given, else on
    a held-out share) and evaluates one model on one category, its test images aligned by
    their true `poses` when given.

    Returns:
        (metrics, predictions, model); metrics hold the METRICS keys plus fit_seconds (None
        for a given model), images_per_second (model throughput on the test set), the
        THRESHOLD_METRICS at the model's calibrated threshold (None when uncalibrated) and,
        for a model whose STN was checked by train_stn, stn_alignment_deg,
        stn_alignment_px and stn_error_ratio (its held-out alignment error) and stn_retries.
        false_reject_bound is the calibrated threshold's guaranteed rate (for images like
        the calibration images; None when uncalibrated).
    """
    fit_seconds = None
    if model is None:
        model, info = fit_model(category.train_paths, options, progress, calibration_paths)
        fit_seconds = info["fit_seconds"]
    predictions = predict_category(model, category, progress, poses)
    metrics = compute_metrics(predictions, model.center_crop)
    metrics["fit_seconds"] = fit_seconds
    metrics["images_per_second"] = len(predictions.paths) / max(predictions.seconds, 1e-9)
    metrics.update(dict.fromkeys(THRESHOLD_METRICS) if model.threshold is None else
                   threshold_metrics(predictions.labels, predictions.scores, model.threshold))
    metrics["false_reject_bound"] = (None if model.calibration is None
                                     else model.calibration.guaranteed_rate)
    record = None if model.stn is None else model.stn.record
    if record is not None:
        alignment = record["alignment"]
        metrics.update(stn_alignment_deg=alignment["rotation_deg"],
                       stn_alignment_px=alignment["translation_px"],
                       stn_error_ratio=alignment["error_ratio"], stn_retries=record["retries"])
    return metrics, predictions, model


def run_arms(category: Category, options: ModelOptions, progress: bool = True,
             baseline: bool = True, calibration_paths=None
             ) -> tuple[dict[str, dict], dict[str, Predictions], dict[str, PaDiM]]:
    """Fits and evaluates `options` on one category beside the baselines (module docstring),
    every arm calibrated on `calibration_paths` (line images, as they are) when given, else
    on the same held-out share.

    Returns:
        ({label: metrics}, {label: predictions}, {label: model}) as run_category gives them:
        for plain PaDiM options just PADIM; with an STN, PADIM, AUGMENTED, STN_PADIM and,
        where the category records true poses, ORACLE (only STN_PADIM when `baseline` is
        False). The STN arm's metrics also hold <metric>_gain for GAIN_METRICS: its value
        minus the better of PaDiM's and PaDiM+aug's.
    """
    if options.stn == "none":
        metrics, predictions, model = run_category(category, options, progress,
                                                   calibration_paths=calibration_paths)
        return {PADIM: metrics}, {PADIM: predictions}, {PADIM: model}
    train = category.train_paths
    fitters = {STN_PADIM: None}
    if baseline:
        fitters = {PADIM: None, **fitters}
        fitters[AUGMENTED] = lambda: fit_posed(train, options, progress, None, calibration_paths)
        if category.poses is not None:
            fitters[ORACLE] = lambda: fit_posed(train, options, progress, category.poses,
                                                calibration_paths)
    metrics, predictions, models = {}, {}, {}
    for label in (PADIM, AUGMENTED, STN_PADIM, ORACLE):
        if label not in fitters:
            continue
        fit = fitters[label]
        arm_options = replace(options, stn="none") if label == PADIM else options
        model, info = (None, {}) if fit is None else fit()
        metrics[label], predictions[label], models[label] = run_category(
            category, arm_options, progress, model=model,
            poses=category.poses if label == ORACLE else None, calibration_paths=calibration_paths)
        if fit is not None:
            metrics[label]["fit_seconds"] = info["fit_seconds"]
    for name in GAIN_METRICS:
        baselines = [metrics[label][name] for label in (PADIM, AUGMENTED) if label in metrics]
        if baselines and None not in baselines and metrics[STN_PADIM][name] is not None:
            metrics[STN_PADIM][f"{name}_gain"] = metrics[STN_PADIM][name] - max(baselines)
    return metrics, predictions, models
