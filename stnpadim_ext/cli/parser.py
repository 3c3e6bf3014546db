"""The argument parser: subcommands, shared option groups and value checks.

Every parse error becomes an InputError, so `main` prints it as one line and exits 2
(argparse's own handler would print the usage block as well).
"""
from __future__ import annotations

import argparse

from ..devices import resolve_device
from ..errors import InputError
from ..models.backbones import BACKBONES
from ..models.padim import MAX_IMAGE_SIZE
from .commands import Parser, top_parser
from .experiment import ModelOptions

STN_CHOICES = ("reconstruct", "canonical", "none")


def build_parser() -> Parser:
    """The `stnpadim` parser with one subparser per command (each sets `run`)."""
    from . import demo, evaluate, export, fit, score, serve, synth  # the commands register themselves

    parser, commands = top_parser()
    common = common_options()
    for module in (demo, fit, score, evaluate, synth, export, serve):
        module.register(commands, common)
    return parser


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
    group.add_argument("--backbone", choices=list(BACKBONES),
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


def device(text: str) -> str:
    """argparse type: a torch device string this machine has."""
    try:
        return str(resolve_device(text, name="--device"))
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--device: ")) from None
