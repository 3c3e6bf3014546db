"""The `stnpadim` command line: demo, fit, score, eval, synth.

    stnpadim demo [--out DIR]
    stnpadim fit   --data ROOT --category C [--backbone B] [--stn reconstruct|canonical|none] --out MODEL
    stnpadim score --model MODEL IMAGE_OR_DIR... [--out DIR]
    stnpadim eval  --data ROOT [--category C ...] [--model MODEL | fit options] [--json FILE]
    stnpadim synth --out ROOT [--categories ...] [--seed N]

A user mistake (missing or unreadable file, bad option value, foreign model file...) ends
the run with exit status 2 and one line `stnpadim: error: <file>: <problem>` on stderr.
"""
from __future__ import annotations

import sys

from ..errors import InputError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 2 user error, 130 interrupted).

    Args:
        argv: arguments without the program name (default: sys.argv[1:]).
    """
    from .parser import COMMANDS, build_parser

    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version
            return exc.code if isinstance(exc.code, int) else 0
        if args.command is None:
            raise InputError(f"choose a command: {', '.join(COMMANDS)} (stnpadim --help)")
        if args.progress is None:
            args.progress = sys.stderr.isatty()
        return args.run(args) or 0
    except InputError as exc:
        return _fail(str(exc))
    except OSError as exc:  # unwritable output folder, disk full: the user's to fix
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        print("stnpadim: interrupted", file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    line = " ".join(message.split())  # one line, whatever the message held
    print(f"stnpadim: error: {line}", file=sys.stderr)
    return 2
