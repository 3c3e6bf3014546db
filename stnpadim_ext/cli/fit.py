"""`stnpadim fit`: fits a model on one category's train/good images and saves it."""
from __future__ import annotations

from pathlib import Path

from .. import distributed
from ..data.images import list_images
from ..data.mvtec import load_category
from .experiment import fit_model
from .model_options import ModelOptions
from .outputs import category_inputs, check_outputs


def run(args) -> int:
    out = Path(args.out)
    category = load_category(args.data, args.category)
    calibration = (list_images(args.calibration) if args.calibration is not None
                   else category.calibration_paths or None)
    # Checked before minutes of fitting, not after; never over a training image.
    inputs = category_inputs(category) + ([args.weights] if args.weights else []) + (calibration or [])
    distributed.on_main(check_outputs, {out: "model file"}, inputs, args.force)  # once, under torchrun
    options = ModelOptions.from_args(args)
    model, info = fit_model(category.train_paths, options, args.progress, calibration)
    if not distributed.is_main():
        return 0  # every rank holds the model; rank 0 writes it
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    cal = model.calibration
    n_fit = len(category.train_paths) - (0 if calibration or cal is None else cal.n)
    history = info.get("stn_history")
    if history is not None:
        print(stn_line(history))
    line = (f"fitted {options.label} ({options.backbone}) on {n_fit} images "
            f"of {category.name} in {info['fit_seconds']:.1f} s; ")
    line += ("uncalibrated (fewer than 3 training images)" if cal is None else
             f"threshold {cal.threshold:.4g} from {cal.n} good images"
             + (f" in random poses (rotation +-{cal.pose_ranges['rotation']:g} deg)"
                if cal.pose_ranges else "")
             + f", guaranteed false-reject rate <= {cal.guaranteed_rate:.3g} for images like them")
    print(f"{line}; saved {out}")
    return 0


def stn_line(history: dict) -> str:
    """One line on the STN's held-out alignment check (train_stn's history)."""
    a = history["val_alignment"]
    weak = " (accepted although weak)" if history["accepted_weak"] else ""
    return (f"STN held-out alignment error {a['rotation_deg']:.2f} deg, {a['translation_px']:.2f} px "
            f"({a['error_ratio']:.2f} of not warping){weak} after {history['retries']} "
            f"retr{'y' if history['retries'] == 1 else 'ies'}, on {a['n_views']} views of "
            f"{a['n_images']} held-out images")
