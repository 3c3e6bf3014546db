"""The argument parser: every command's options and their value checks.

No torch here: `stnpadim --help`, a command's --help and a mistyped option answer at once;
a command's module (and torch) loads only once its arguments parse. Every parse error
becomes an InputError, so `main` prints it as one line and exits 2 (argparse's own handler
would print the usage block as well).
"""
from __future__ import annotations

import argparse
import inspect

from .. import __version__
from ..catalog import (
    BACKBONE_NAMES,
    FACTOR_DTYPES,
    HEATMAP_MAX_SIDE,
    MAX_IMAGE_SIZE,
    ONNX_FACTOR_STORAGE,
    ONNX_INPUT_DTYPES,
)
from ..data import synth
from ..errors import InputError
from .model_options import ModelOptions

COMMANDS = {
    "demo": "run the whole pipeline on a small synthetic set",
    "fit": "fit a model on good images and save it",
    "score": "score images with a saved model",
    "eval": "evaluate on MVTec-format test sets",
    "synth": "write an MVTec-format synthetic data set",
    "export": "export a saved model to ONNX",
    "serve": "serve a saved model over HTTP (dynamic batching)",
}
STN_CHOICES = ("reconstruct", "canonical", "none")
# Defaults synth's --help shows are the generator's own, so the two cannot drift apart.
SYNTH_DEFAULTS = {name: p.default for name, p in inspect.signature(synth.make_dataset).parameters.items()}
SYNTH_SIZES = {"image_size": ((32, synth.MAX_IMAGE_SIZE), "PX", "square image side"),
               "n_train": ((1,), "N", "good training images per category"),
               "n_test_good": ((0,), "N", "good test images per category"),
               "n_test_defect": ((0,), "N", "test images per defect type per category"),
               "n_calibration": ((0,), "N", "good line images per category, posed like the test "
                                            "images, in CAT/calibration/good (fit and eval "
                                            "calibrate on them)")}
# --max-wait-ms ceiling: beyond a minute a typo (10000000) would hold every lone request.
MAX_WAIT_MS = 60_000.0


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise InputError instead of printing usage and exiting."""

    def error(self, message: str):
        raise InputError(message)


def build_parser() -> Parser:
    """The `stnpadim` parser with one subparser per command; each sets `module`, the name of
    the module in this package whose run(args) carries the command out."""
    parser = Parser(prog="stnpadim", description="PaDiM anomaly detection with a "
                    "self-supervised Spatial Transformer (STN).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    common = common_options()
    # Each command, the module in this package whose run(args) carries it out, its options.
    for name, module, add_options in (
            ("demo", "demo", _demo_options), ("fit", "fit", _fit_options),
            ("score", "score", _score_options), ("eval", "evaluate", _evaluate_options),
            ("synth", "synth", _synth_options), ("export", "export", _export_options),
            ("serve", "serve", _serve_options)):
        sub = commands.add_parser(name, parents=[common], help=COMMANDS[name])
        add_options(sub)
        sub.set_defaults(module=module)
    return parser


def _demo_options(parser: Parser) -> None:
    parser.description = (
        "Writes a small synthetic data set (a texture, an aligned part, a part "
        "whose test images drift in pose, a part in random poses), fits PaDiM, "
        "PaDiM on pose-augmented images, STN+PaDiM and the oracle (aligned by the "
        "true poses) with efficientnet_lite0, prints the comparison and decision "
        "tables and writes heatmaps and an HTML report (report/index.html). "
        "Offline; the same seed gives the same tables.")
    parser.add_argument("--out", default="stnpadim_demo", metavar="DIR",
                        help="folder for table.md, results.json, heatmaps/ and report/ "
                             "(default: ./stnpadim_demo)")
    parser.add_argument("--seed", type=at_least(0), default=0, help="data and model seed (default: 0)")
    add_force_option(parser)


def _fit_options(parser: Parser) -> None:
    parser.description = (
        "Fits PaDiM (behind a self-supervised STN unless --stn none) on "
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


def _score_options(parser: Parser) -> None:
    parser.description = (
        "Scores images (files, or every image in the given folders and their "
        "sub-folders; other files there are skipped with a note) and writes "
        "one heatmap overlay PNG per image (longest side at most "
        f"{HEATMAP_MAX_SIDE} px) and scores.csv (image, score, normalized_score, "
        "anomalous, heatmap) to --out. normalized_score is score / the model's "
        "calibrated threshold; above 1 is anomalous.")
    parser.add_argument("--model", required=True, metavar="MODEL", help="model file from `fit`")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="images or folders")
    parser.add_argument("--out", default="stnpadim_scores", metavar="DIR",
                        help="output folder (default: ./stnpadim_scores)")
    parser.add_argument("--vmax", type=positive_float, default=None,
                        help="anomaly value shown in the hottest colour (default: twice the "
                             "model's threshold; for an uncalibrated model, the highest value "
                             "over all scored images)")
    parser.add_argument("--masks", action="store_true",
                        help="also write <name>_mask.png: the defect region (map > threshold)")
    parser.add_argument("--report", metavar="DIR",
                        help="write an HTML report (DIR/index.html: histogram, gallery)")
    parser.add_argument("--factor-dtype", choices=FACTOR_DTYPES, default="float32",
                        help="storage of the precision factor the distances read: bfloat16 "
                             "halves the bytes per image (faster at small batches) and moves "
                             "distances by ~0.05%% (default: float32)")
    add_run_options(parser)
    add_force_option(parser)


def _evaluate_options(parser: Parser) -> None:
    parser.description = (
        "Fits and calibrates a model per category (or takes --model) and reports "
        "image AUROC, pixel AUROC, AUPRO and image F1, then the false-reject rate, "
        "miss rate, precision, recall and F1 at the calibrated threshold, as "
        "markdown tables. With an STN, the baselines a user would try instead are "
        "fitted beside it: plain PaDiM, PaDiM on pose-augmented images and, where "
        "the data records true poses (stnpadim synth), the oracle aligned by them. "
        "A category's calibration/good folder, when present, sets the thresholds.")
    parser.add_argument("--data", required=True, metavar="ROOT", help="MVTec-format data folder")
    parser.add_argument("--category", nargs="+", metavar="C",
                        help="categories (default: every folder of ROOT with train/good)")
    parser.add_argument("--model", metavar="MODEL",
                        help="evaluate this model file (one category) instead of fitting")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--table", metavar="FILE", help="write the markdown tables")
    parser.add_argument("--report", metavar="DIR",
                        help="write an HTML report (DIR/index.html: curves, histograms, gallery)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="with an STN, skip the baseline columns (PaDiM, PaDiM on "
                             "pose-augmented images, oracle)")
    parser.add_argument("--seeds", type=at_least(1), default=1, metavar="N",
                        help="fit and evaluate with N seeds (--seed, --seed + 1, ...) and report "
                             "mean, sd (<name>_sd) and 95%% t-interval over the seeds "
                             "(<name>_ci95) of each metric (default: 1)")
    add_model_options(parser)
    add_run_options(parser)
    add_force_option(parser)


def _synth_options(parser: Parser) -> None:
    parser.description = (
        "Writes procedural textures and parts with defects and exact masks in the "
        "MVTec AD layout, deterministic by --seed.")
    parser.add_argument("--out", required=True, metavar="ROOT", help="output folder")
    parser.add_argument("--categories", nargs="+", choices=list(synth.CATEGORIES), metavar="C",
                        help=f"categories to write (default: all of {', '.join(synth.CATEGORIES)})")
    parser.add_argument("--seed", type=at_least(0), default=SYNTH_DEFAULTS["seed"],
                        help=f"random seed (default: {SYNTH_DEFAULTS['seed']})")
    for name, (bounds, metavar, text) in SYNTH_SIZES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=at_least(*bounds),
                            default=SYNTH_DEFAULTS[name], metavar=metavar,
                            help=f"{text} (default: {SYNTH_DEFAULTS[name]})")
    parser.add_argument("--pose", choices=list(synth.POSE_MODES), default=None,
                        help="pose mode for every category (default: each category's own)")
    parser.add_argument("--force", action="store_true",
                        help="replace category folders written earlier by synth")


def _export_options(parser: Parser) -> None:
    parser.description = (
        "Writes MODEL as an ONNX graph: input images [B, 3, H, W] (H, W = the "
        "model's image size), outputs scores [B] and maps [B, H, W] equal to "
        "`score`'s, plus normalized_scores, anomalous and masks for a calibrated model. "
        "Needs the export extra: pip install \"stnpadim[export]\".")
    parser.add_argument("--model", required=True, metavar="MODEL", help="model file from `fit`")
    parser.add_argument("--out", required=True, metavar="FILE", help="ONNX file to write")
    parser.add_argument("--input-dtype", choices=ONNX_INPUT_DTYPES, default="float32",
                        help="float32: pixels in [0, 1] (default); uint8: pixels in 0..255")
    parser.add_argument("--batch", type=at_least(1), metavar="N",
                        help="fix the batch size (default: dynamic)")
    parser.add_argument("--factor", choices=ONNX_FACTOR_STORAGE, default="packed",
                        help="storage of the precision factors: packed (default, half the "
                             "size, same speed under ONNX Runtime) or dense")
    add_force_option(parser)


def _serve_options(parser: Parser) -> None:
    parser.description = (
        "Loads MODEL once and answers POST /v1/score (body: an image file's bytes) "
        "with the score, normalized score and decision as `stnpadim score` computes "
        "them; ?heatmap=1 / ?mask=1 add the heatmap overlay / mask as base64 PNGs. "
        "Concurrent requests are scored together, up to --max-batch images or "
        "--max-wait-ms. Also GET /v1/model, /healthz and /metrics (Prometheus). "
        "SIGTERM or Ctrl-C: stop accepting, finish queued work, exit 0. "
        "Needs the serve extra: pip install \"stnpadim[serve]\".")
    parser.add_argument("--model", required=True, metavar="MODEL", help="model file from `fit`")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; "
                             "0.0.0.0 for every interface)")
    parser.add_argument("--port", type=at_least(0, 65535), default=8000,
                        help="TCP port (default: 8000; 0 picks a free one, named in the start line)")
    parser.add_argument("--max-batch", type=at_least(1, 1024), default=32, metavar="N",
                        help="most images per model call (default: 32)")
    parser.add_argument("--max-wait-ms", type=milliseconds, default=10.0, metavar="MS",
                        help="longest a request waits for others to share its batch (default: 10)")
    parser.add_argument("--max-queue", type=at_least(1), default=256, metavar="N",
                        help="most requests waiting for a batch; more get 503 (default: 256)")
    parser.add_argument("--max-image-mb", type=positive_float, default=50.0, metavar="MB",
                        help="largest request body in MB (2^20 bytes); larger gets 413 (default: 50)")
    parser.add_argument("--device", type=device, help="cpu, cuda or cuda:N (default: cuda when available)")


def common_options() -> Parser:
    """Options every command takes (a parent parser)."""
    parent = Parser(add_help=False)
    parent.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show progress bars (default: when stderr is a terminal)")
    return parent


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options that define how a model is fitted (fit, eval without --model).

    Defaults are None here, filled in by ModelOptions, so a command can tell which ones
    the user gave.
    """
    defaults = ModelOptions()
    group = parser.add_argument_group("model")
    group.add_argument("--backbone", choices=list(BACKBONE_NAMES),
                       help=f"feature extractor (default: {defaults.backbone}, works offline)")
    group.add_argument("--weights", metavar="FILE", help="backbone state-dict file (default: "
                       "resnet18 / wide_resnet50_2 read torchvision's ImageNet file from torch.hub's "
                       "cache, downloaded once unless STNPADIM_OFFLINE=1)")
    group.add_argument("--stn", choices=STN_CHOICES,
                       help=f"STN objective, or none for plain PaDiM (default: {defaults.stn})")
    group.add_argument("--stn-epochs", type=at_least(1), metavar="N",
                       help="maximum STN training epochs (default: the trainer's, per "
                            "objective; training stops early when validation stalls)")
    group.add_argument("--stn-symmetry", type=at_least(1), metavar="N",
                       help="the part looks the same after a 1/N turn (e.g. 2): the STN's "
                            "alignment check measures rotations modulo 360/N degrees (default: 1)")
    group.add_argument("--accept-weak-stn", action="store_true", default=None,
                       help="keep an STN that fails its held-out alignment check (after its "
                            "retries) with a warning, instead of stopping with an error")
    group.add_argument("--image-size", type=at_least(32, MAX_IMAGE_SIZE), metavar="PX",
                       help=f"images are resized to PX x PX, 32..{MAX_IMAGE_SIZE} "
                            f"(default: {defaults.image_size})")
    group.add_argument("--center-crop", type=at_least(32, MAX_IMAGE_SIZE), metavar="PX",
                       help="then crop PX x PX from the centre (the PaDiM paper: 256 + 224)")
    group.add_argument("--n-features", type=at_least(1), metavar="N",
                       help="embedding channels kept (default: the backbone's)")
    group.add_argument("--seed", type=at_least(0),
                       help=f"seed of the channel subset, the calibration hold-out and the STN "
                            f"training (default: {defaults.seed})")
    group.add_argument("--false-reject-rate", type=probability, metavar="A",
                       help="target share of good images called anomalous; sets the calibrated "
                            f"threshold (default: {defaults.false_reject_rate})")


MODEL_OPTIONS = ("backbone", "weights", "stn", "stn_epochs", "stn_symmetry", "accept_weak_stn",
                 "image_size", "center_crop", "n_features", "seed", "false_reject_rate")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options of how any model runs."""
    parser.add_argument("--device", type=device,
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--batch-size", type=at_least(1), metavar="N",
                        help=f"images per forward pass (default: {ModelOptions().batch_size})")


def add_force_option(parser: argparse.ArgumentParser) -> None:
    """--force: replace existing files that are not outputs of ours (inputs never)."""
    parser.add_argument("--force", action="store_true",
                        help="overwrite existing files even when they are not earlier stnpadim "
                             "outputs of the same kind (never an input of the same command)")


def at_least(minimum: int, at_most: int | None = None):
    """argparse type: an integer >= minimum (and <= at_most when given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}; got {value}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"must be <= {at_most}; got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}" if at_most is None else f"integer in {minimum}..{at_most}"
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text}")
    return value


def probability(text: str) -> float:
    """argparse type: a float strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive); got {text}")
    return value


def milliseconds(text: str) -> float:
    """argparse type: a wait in milliseconds, 0..MAX_WAIT_MS."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
    if not 0.0 <= value <= MAX_WAIT_MS:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_WAIT_MS:g}; got {text}")
    return value


def device(text: str) -> str:
    """argparse type: a torch device string this machine has (checking it imports torch)."""
    from ..devices import resolve_device

    try:
        return str(resolve_device(text, name="--device"))
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--device: ")) from None
