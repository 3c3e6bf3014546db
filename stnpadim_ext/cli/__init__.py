"""The `stnpadim` command line: demo, fit, score, eval, synth, export, serve.

    stnpadim demo [--out DIR]
    stnpadim fit   --data ROOT --category C [--backbone B] [--stn reconstruct|canonical|none] --out MODEL
    stnpadim score --model MODEL IMAGE_OR_DIR... [--out DIR]
    stnpadim eval  --data ROOT [--category C ...] [--model MODEL | fit options] [--json FILE]
    stnpadim synth --out ROOT [--categories ...] [--seed N]
    stnpadim export --model MODEL --out MODEL.onnx [--input-dtype float32|uint8]
    stnpadim serve --model MODEL [--host H] [--port P] [--max-batch N] [--max-wait-ms MS] ...

A user mistake (missing or unreadable file, bad option value, foreign model file...) ends
the run with exit status 2 and one line `stnpadim: error: <file>: <problem>` on stderr.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import warnings

from ..errors import InputError
from .parser import COMMANDS, build_parser

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 2 user error, 130 interrupted,
    143 terminated by SIGTERM).

    Args:
        argv: arguments without the program name (default: sys.argv[1:]).
    """
    argv = sys.argv[1:] if argv is None else argv
    _tolerate_odd_names(sys.stdout)
    previous = _on_sigterm(_terminate)
    try:
        try:  # no torch yet: help and argument mistakes answer at once
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help, --version
            return exc.code if isinstance(exc.code, int) else 0
        if args.command is None:
            raise InputError(f"choose a command: {', '.join(COMMANDS)} (stnpadim --help)")
        if args.progress is None:
            args.progress = sys.stderr.isatty()
        if args.command == "demo":  # its first output would wait for torch and the models
            print("demo: loading PyTorch ...", flush=True)
        from .ranks import run_command

        args.run = importlib.import_module(f"{__name__}.{args.module}").run
        with warnings.catch_warnings():
            warnings.showwarning = _warn
            return run_command(args)  # in this process, or as a rank under torchrun
    except InputError as exc:
        return _fail(str(exc))
    except OSError as exc:  # unwritable output folder, disk full: the user's to fix
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}")
    except KeyboardInterrupt as exc:  # temporary files are removed on the way out
        terminated = isinstance(exc, Terminated)
        print(f"stnpadim: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        _on_sigterm(previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


def _terminate(signum, frame):
    raise Terminated()


def _on_sigterm(handler):
    """Installs `handler` for SIGTERM (main thread only); returns the previous one."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _tolerate_odd_names(stream) -> None:
    # A file name that is not UTF-8 (kept by Python as surrogates) must print, not crash.
    if hasattr(stream, "reconfigure") and getattr(stream, "errors", None) == "strict":
        stream.reconfigure(errors="backslashreplace")


def _warn(message, *_args, **_kwargs) -> None:
    # A warning meant for the user (e.g. too few calibration images): one line, no source.
    print(f"stnpadim: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _fail(message: str) -> int:
    if "RANK" in os.environ:  # maybe a torchrun rank (checked without torch otherwise)
        from .ranks import fail_together

        fail_together(message)  # under torchrun: rank 0 says it, every rank exits 2 (no return)
    line = " ".join(message.split())  # one line, whatever the message held
    print(f"stnpadim: error: {line}", file=sys.stderr)
    return 2
