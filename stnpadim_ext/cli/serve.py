"""`stnpadim serve`: an HTTP scoring service for a saved model, with dynamic batching.

FastAPI, uvicorn and prometheus-client (the "serve" extra) are imported only when the
command runs; without them it says how to install them, in one line, and exits 2.
"""
from __future__ import annotations

import argparse
import importlib

from ..errors import InputError
from .parser import at_least, device, positive_float

SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")
# --max-wait-ms ceiling: beyond a minute a typo (10000000) would hold every lone request.
MAX_WAIT_MS = 60_000.0


def register(commands, common) -> None:
    parser = commands.add_parser(
        "serve", parents=[common], help="serve a saved model over HTTP (dynamic batching)",
        description="Loads MODEL once and answers POST /v1/score (body: an image file's bytes) "
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
    parser.set_defaults(run=run)


def milliseconds(text: str) -> float:
    """argparse type: a wait in milliseconds, 0..MAX_WAIT_MS."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
    if not 0.0 <= value <= MAX_WAIT_MS:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_WAIT_MS:g}; got {text}")
    return value


def run(args) -> int:
    for package in SERVE_PACKAGES:
        try:
            importlib.import_module(package)
        except ImportError:
            raise InputError(f"serve needs the optional package {package}: "
                             'pip install "stnpadim[serve]"') from None
    from ..serve.app import Limits
    from ..serve.server import serve

    limits = Limits(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                    max_image_mb=args.max_image_mb)
    return serve(args.model, args.host, args.port, limits, device=args.device)
