"""`stnpadim fit`: fits a model on one category's train/good images and saves it."""
from __future__ import annotations

from pathlib import Path

from ..data.images import list_images
from ..data.mvtec import load_category
from .experiment import ModelOptions, fit_model
from .outputs import category_inputs, check_outputs
from .parser import add_force_option, add_model_options, add_run_options


def register(commands, common) -> None:
    parser = commands.add_parser(
        "fit", parents=[common], help="fit a model on good images and save it",
        description="Fits PaDiM (behind a self-supervised STN unless --stn none) on "
                    "ROOT/CATEGORY/train/good and writes the model file. A seeded share of the "
                    "training images (10%%, at least 20 when a quarter of them is that many) is "
                    "held out to calibrate the anomaly threshold, unless --calibration is given.")
    parser.add_argument("--data", required=True, metavar="ROOT", help="MVTec-format data folder")
    parser.add_argument("--category", required=True, metavar="C", help="category folder name")
    parser.add_argument("--out", required=True, metavar="MODEL", help="model file to write")
    parser.add_argument("--calibration", metavar="DIR",
                        help="folder of good images that sets the threshold (then every "
                             "training image is used for fitting)")
    add_model_options(parser)
    add_run_options(parser)
    add_force_option(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    out = Path(args.out)
    category = load_category(args.data, args.category)
    calibration = None if args.calibration is None else list_images(args.calibration)
    # Checked before minutes of fitting, not after; never over a training image.
    inputs = category_inputs(category) + ([args.weights] if args.weights else []) + (calibration or [])
    check_outputs({out: "model file"}, inputs, args.force)
    options = ModelOptions.from_args(args)
    model, info = fit_model(category.train_paths, options, args.progress, calibration)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    cal = model.calibration
    n_fit = len(category.train_paths) - (0 if calibration or cal is None else cal.n)
    line = (f"fitted {options.label} ({options.backbone}) on {n_fit} images "
            f"of {category.name} in {info['fit_seconds']:.1f} s; ")
    line += ("uncalibrated (fewer than 3 training images)" if cal is None else
             f"threshold {cal.threshold:.4g} from {cal.n} good images, guaranteed false-reject "
             f"rate <= {cal.guaranteed_rate:.3g}")
    alignment = info.get("stn_history", {}).get("val_alignment")
    if alignment:
        line += (f"; STN held-out error {alignment['rotation_deg']:.2f} deg, "
                 f"{alignment['translation_px']:.2f} px")
    print(f"{line}; saved {out}")
    return 0
