"""Command names and the top-level parser. No torch here: `stnpadim --help`, `--version`
and a mistyped command answer at once; a command's own options load its module."""
from __future__ import annotations

import argparse

from ..errors import InputError

COMMANDS = {
    "demo": "run the whole pipeline on a small synthetic set",
    "fit": "fit a model on good images and save it",
    "score": "score images with a saved model",
    "eval": "evaluate on MVTec-format test sets",
    "synth": "write an MVTec-format synthetic data set",
    "export": "export a saved model to ONNX",
    "serve": "serve a saved model over HTTP (dynamic batching)",
}


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise InputError instead of printing usage and exiting."""

    def error(self, message: str):
        raise InputError(message)


def top_parser() -> tuple[Parser, argparse._SubParsersAction]:
    """The `stnpadim` parser without the commands' options, and its subparser group."""
    from .. import __version__

    parser = Parser(prog="stnpadim", description="PaDiM anomaly detection with a "
                    "self-supervised Spatial Transformer (STN).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser, parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)


def command_parser() -> Parser:
    """The top-level parser with every command listed but none of their options."""
    parser, commands = top_parser()
    for name, text in COMMANDS.items():
        commands.add_parser(name, help=text)
    return parser


def requested_command(argv: list[str]) -> str | None:
    """The command argv asks for (its first non-option word), if it names one."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None
