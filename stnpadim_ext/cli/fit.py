"""`stnpadim fit`: fits a model on one category's train/good images and saves it."""
from __future__ import annotations

from pathlib import Path

from .. import distributed
from ..data.images import list_images
from ..data.mvtec import load_category
from .commands import COMMANDS
from .experiment import ModelOptions, fit_model
from .outputs import category_inputs, check_outputs
from .parser import add_force_option, add_model_options, add_run_options


def register(commands, common) -> None:
    parser = commands.add_parser(
        "fit", parents=[common], help=COMMANDS["fit"],
        description="Fits PaDiM (behind a self-supervised STN unless --stn none) on "
                    "ROOT/CATEGORY/train/good and writes the model file. The anomaly threshold "
                    "is calibrated on --calibration DIR, else on ROOT/CATEGORY/calibration/good "
                    "when it exists (good images from the line), else on a seeded share of the "
                    "training images held out from fitting (10%, at least 20 when a quarter of "
                    "them is that many), which behind an STN are scored in random poses of its "
                    "training range.")
    parser.add_argument("--data", required=True, metavar="ROOT", help="MVTec-format data folder")
    parser.add_argument("--category", required=True, metavar="C", help="category folder name")
    parser.add_argument("--out", required=True, metavar="MODEL", help="model file to write")
    parser.add_argument("--calibration", metavar="DIR",
                        help="folder of good images from the line that sets the threshold "
                             "(then every training image is used for fitting)")
    add_model_options(parser)
    add_run_options(parser)
    add_force_option(parser)
    parser.set_defaults(run=run)


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
