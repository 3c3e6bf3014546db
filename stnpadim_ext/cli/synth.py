"""`stnpadim synth`: writes an MVTec-format synthetic data set."""
from __future__ import annotations

import inspect

from ..data.synth import CATEGORIES, MAX_IMAGE_SIZE, POSE_MODES, make_dataset
from .commands import COMMANDS
from .outputs import check_writable_folder
from .parser import at_least

# Defaults shown in --help are the generator's own, so the two cannot drift apart.
_DEFAULTS = {name: p.default for name, p in inspect.signature(make_dataset).parameters.items()}
_SIZES = {"image_size": ((32, MAX_IMAGE_SIZE), "PX", "square image side"),
          "n_train": ((1,), "N", "good training images per category"),
          "n_test_good": ((0,), "N", "good test images per category"),
          "n_test_defect": ((0,), "N", "test images per defect type per category"),
          "n_calibration": ((0,), "N", "good line images per category, posed like the test "
                                       "images, in CAT/calibration/good (fit and eval calibrate on them)")}


def register(commands, common) -> None:
    parser = commands.add_parser(
        "synth", parents=[common], help=COMMANDS["synth"],
        description="Writes procedural textures and parts with defects and exact masks in the "
                    "MVTec AD layout, deterministic by --seed.")
    parser.add_argument("--out", required=True, metavar="ROOT", help="output folder")
    parser.add_argument("--categories", nargs="+", choices=list(CATEGORIES), metavar="C",
                        help=f"categories to write (default: all of {', '.join(CATEGORIES)})")
    parser.add_argument("--seed", type=at_least(0), default=_DEFAULTS["seed"],
                        help=f"random seed (default: {_DEFAULTS['seed']})")
    for name, (bounds, metavar, text) in _SIZES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=at_least(*bounds),
                            default=_DEFAULTS[name], metavar=metavar,
                            help=f"{text} (default: {_DEFAULTS[name]})")
    parser.add_argument("--pose", choices=list(POSE_MODES), default=None,
                        help="pose mode for every category (default: each category's own)")
    parser.add_argument("--force", action="store_true",
                        help="replace category folders written earlier by synth")
    parser.set_defaults(run=run)


def run(args) -> int:
    check_writable_folder(args.out)  # a file in the way fails now, not after the first category
    names = make_dataset(args.out, categories=args.categories, seed=args.seed,
                         pose=args.pose, overwrite=args.force, progress=args.progress,
                         **{name: getattr(args, name) for name in _SIZES})
    print(f"wrote {len(names)} categories to {args.out}: {', '.join(names)}")
    return 0
