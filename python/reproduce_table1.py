"""The paper's Table 1 on an MVTec AD folder: PaDiM, PaDiM+aug and STN+PaDiM, 15 categories.

    python python/reproduce_table1.py --mvtec /data/mvtec_anomaly_detection

The published reference columns are the seed paper's Table 1, which is the PaDiM reference
implementation's wide_resnet50_2 table; the default backbone is therefore wide_resnet50_2,
so the printed columns compare like with like. With another backbone the reference is
still printed, labelled with its backbone, for orientation only.

PaDiM, PaDiM on pose-augmented images (the STN's training ranges) and STN+PaDiM (and, on
a synthetic set that records true poses, the oracle aligned by them) get the same
pre-processing (by default the PaDiM paper's: resize to 256, centre crop 224; the
seed paper's baseline column was copied from another repository with a different one),
the same backbone and weights and the same random channel subset; the only difference is
what stands in front. Pixel metrics are
computed in the input frame against the untouched ground-truth masks (the anomaly maps
are warped back, the masks never warped), restricted to the crop the model sees.

Prints the table (image AUROC, pixel AUROC, AUPRO; texture, object and overall means,
as in the paper) and the published numbers for reference; writes --json / --table.
Any MVTec-format folder works, e.g. a synthetic one (`stnpadim synth`) with --categories.
Exit status 2 with one `reproduce_table1: error: ...` line on bad input.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from stnpadim_ext.cli.experiment import run_arms
from stnpadim_ext.cli.model_options import ModelOptions
from stnpadim_ext.cli.parser import at_least, device
from stnpadim_ext.data.mvtec import MVTEC_CATEGORIES, load_category
from stnpadim_ext.data.synth import CATEGORIES as SYNTH_CATEGORIES
from stnpadim_ext.errors import InputError
from stnpadim_ext.models.backbones import BACKBONES
from stnpadim_ext.report import markdown_table, summarize, write_json, write_text

# Categories whose parts come in any pose (train and test): the "auto" objective trains
# their STN for invariance (canonical) instead of reconstruction.
RANDOM_POSE = {"screw", "metal_nut", "hazelnut"} | {
    name for name, spec in SYNTH_CATEGORIES.items() if spec["pose"] == "random"}

# The seed paper's Table 1 (image AUROC, pixel AUROC; PaDiM, STN+PaDiM), for reference: the
# PaDiM reference implementation's wide_resnet50_2 numbers.
PAPER_BACKBONE = "wide_resnet50_2"
PAPER = {
    "carpet": (0.999, 1.0, 0.99, 0.992), "grid": (0.957, 0.964, 0.965, 0.965),
    "leather": (1.0, 1.0, 0.989, 0.99), "tile": (0.974, 0.988, 0.939, 0.945),
    "wood": (0.988, 0.989, 0.941, 0.941), "bottle": (0.998, 0.998, 0.982, 0.985),
    "cable": (0.922, 0.924, 0.968, 0.977), "capsule": (0.915, 0.927, 0.986, 0.987),
    "hazelnut": (0.933, 0.964, 0.979, 0.85), "metal_nut": (0.992, 0.999, 0.971, 0.979),
    "pill": (0.944, 0.942, 0.961, 0.97), "screw": (0.844, 0.857, 0.983, 0.987),
    "toothbrush": (0.972, 0.864, 0.987, 0.989), "transistor": (0.978, 0.992, 0.975, 0.981),
    "zipper": (0.909, 0.917, 0.984, 0.986),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--mvtec", required=True, metavar="ROOT", help="MVTec AD folder")
    parser.add_argument("--backbone", choices=list(BACKBONES), default=PAPER_BACKBONE,
                        help=f"the published columns are {PAPER_BACKBONE}'s; another backbone "
                             "is not comparable with them")
    parser.add_argument("--weights", metavar="FILE", help="backbone weights file (default: "
                        "torchvision's, from torch.hub's cache or downloaded into it once)")
    parser.add_argument("--categories", nargs="+", default=list(MVTEC_CATEGORIES), metavar="C")
    parser.add_argument("--stn", choices=("reconstruct", "canonical", "auto"), default="reconstruct",
                        help="STN objective; auto: canonical for random-pose categories "
                             f"({', '.join(sorted(RANDOM_POSE))}), reconstruct for the others")
    parser.add_argument("--stn-epochs", type=at_least(1), default=None,
                        help="maximum STN epochs (default: train_stn's)")
    parser.add_argument("--accept-weak-stn", action="store_true",
                        help="keep an STN that fails its held-out alignment check (reported in "
                             "the JSON as stn_error_ratio) instead of stopping")
    parser.add_argument("--image-size", type=at_least(32), default=256)
    parser.add_argument("--center-crop", type=at_least(32), default=224,
                        help="centre crop after the resize (the PaDiM paper's)")
    parser.add_argument("--no-crop", action="store_true", help="no centre crop")
    parser.add_argument("--seed", type=at_least(0), default=0)
    parser.add_argument("--batch-size", type=at_least(1), default=32)
    parser.add_argument("--device", type=device, default=None)
    parser.add_argument("--json", metavar="FILE", help="write every column's results as JSON")
    parser.add_argument("--table", metavar="FILE", help="write the markdown table")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: when stderr is a terminal)")
    args = parser.parse_args(argv)
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    return args


def reproduce(args: argparse.Namespace) -> tuple[dict, str]:
    """Runs PaDiM, its baselines and STN+PaDiM on every category; returns
    ({label: results}, markdown)."""
    categories = [load_category(args.mvtec, name) for name in dict.fromkeys(args.categories)]
    for category in categories:  # every folder checked before hours of fitting
        if not category.test_items:
            raise InputError(f"{category.path / 'test'}: no test images to evaluate on")
    base = ModelOptions(backbone=args.backbone, weights=args.weights, stn="none",
                        stn_epochs=args.stn_epochs, accept_weak_stn=args.accept_weak_stn,
                        image_size=args.image_size,
                        center_crop=None if args.no_crop else args.center_crop,
                        seed=args.seed, batch_size=args.batch_size, device=args.device)
    per_arm = {}
    for category in categories:
        objective = args.stn
        if objective == "auto":
            objective = "canonical" if category.name in RANDOM_POSE else "reconstruct"
        metrics, _, _ = run_arms(category, replace(base, stn=objective), args.progress)
        for label, values in metrics.items():
            per_arm.setdefault(label, {})[category.name] = values
    arms = {label: summarize(results) for label, results in per_arm.items()}
    groups = {"textures": [c.name for c in categories if c.is_texture],
              "objects": [c.name for c in categories if not c.is_texture]}
    return arms, markdown_table(arms, groups=groups)


def paper_table(names: list[str]) -> str:
    """The published numbers of the categories in `names` (MVTec AD ones only), or ""."""
    rows = {n: PAPER[n] for n in names if n in PAPER}
    if not rows:
        return ""
    arms = {f"{label} (paper, {PAPER_BACKBONE})": summarize(
        {n: {"image_auroc": v[i], "pixel_auroc": v[i + 2]} for n, v in rows.items()})
        for i, label in enumerate(("PaDiM", "STN+PaDiM"))}
    return markdown_table(arms, metrics=("image_auroc", "pixel_auroc"))


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        arms, table = reproduce(args)
        print(f"Measured here with {args.backbone}:\n")
        print(table, end="")
        published = paper_table(args.categories)
        if published:
            print(f"\nPublished in the seed paper, backbone {PAPER_BACKBONE} (its baseline used "
                  "another pre-processing):\n")
            if args.backbone != PAPER_BACKBONE:
                print(f"NOTE: measured with {args.backbone}, not {PAPER_BACKBONE}: the two tables "
                      "are not comparable.\n")
            print(published, end="")
        if args.json:
            write_json(args.json, arms)
        if args.table:
            write_text(args.table, table)
    except InputError as exc:
        print(f"reproduce_table1: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise InputError(message)


if __name__ == "__main__":
    sys.exit(main())
