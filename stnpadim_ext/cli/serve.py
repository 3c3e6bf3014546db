"""`stnpadim serve`: an HTTP scoring service for a saved model, with dynamic batching.

FastAPI, uvicorn and prometheus-client (the "serve" extra) are imported only when the
command runs; without them it says how to install them, in one line, and exits 2.
"""
from __future__ import annotations

import importlib

from ..errors import InputError

SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")


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
