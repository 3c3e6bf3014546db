"""Running the service: bind the port, load the model, serve with uvicorn until a signal.

One log line when the service is ready (address, model, settings) and one when it has
stopped. A first SIGTERM or Ctrl-C stops accepting connections, lets every admitted
request finish (queued ones are scored), then exits 0; a second one while draining stops
at once, the CLI's way: exit 143 (SIGTERM) or 130 (Ctrl-C).
"""
from __future__ import annotations

import errno
import logging
import signal
import socket
import sys

import uvicorn

from ..errors import InputError
from .app import Limits, Service, build_app
from .scoring import Scorer

log = logging.getLogger("stnpadim.serve")
# Exit status after a second signal, as `stnpadim` reports an interrupted command.
FORCED_EXIT = {signal.SIGTERM: 143, signal.SIGINT: 130}


class _Server(uvicorn.Server):
    """uvicorn's server with our signal rule: first signal drains, second stops at once,
    answering waiting requests 503 first (and no signal is re-raised afterwards, so the
    exit status is ours to give)."""

    stopped_by: int | None = None
    forced_by: int | None = None
    service: Service | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit:
            self.force_exit, self.forced_by = True, sig
            if self.service is not None:
                self.service.abort()  # the answers go out during uvicorn's 0.1 s shutdown pause
        else:
            self.should_exit, self.stopped_by = True, sig


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          device=None) -> int:
    """Serves `model` until stopped; returns the exit status (0, or 143 / 130 when a second
    signal cut the drain short).

    Raises:
        InputError: the address cannot be used, or the model file is missing or damaged.
    """
    limits = limits or Limits()
    _log_to_stderr()
    sock = bind(host, port)  # before the model loads: a taken port fails in a second
    try:
        scorer = Scorer.load(model, device)
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
        url = _url(host, sock.getsockname()[1])

        def ready(service: Service) -> None:
            info = scorer.info()
            threshold = "uncalibrated" if scorer.threshold is None else f"threshold {scorer.threshold:.6g}"
            log.info("listening on %s: model %s (%s, %dx%d px, %s) on %s; max batch %d, max wait %g ms, "
                     "queue %d, body limit %g MB", url, scorer.name, info["backbone"], *info["image_size"],
                     threshold, info["device"], limits.max_batch, limits.max_wait_ms, limits.max_queue,
                     limits.max_image_mb)

        app = build_app(scorer, limits, on_ready=ready)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=None)
        server = _Server(config)
        server.service = app.state.service
        server.run(sockets=[sock])
    finally:
        sock.close()
    service: Service = app.state.service
    counts = f"{service.answered} scoring requests handled, {service.scored} images scored"
    if server.forced_by is not None:
        log.info("stopped at once by a second %s: %s", signal.Signals(server.forced_by).name, counts)
        return FORCED_EXIT.get(server.forced_by, 143)
    by = "" if server.stopped_by is None else f" by {signal.Signals(server.stopped_by).name}"
    log.info("stopped%s after finishing queued work: %s", by, counts)
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; port 0 picks a free one.

    Raises:
        InputError naming --host / --port when the address cannot be used.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise InputError(f"--port {port}: cannot listen on {host}:{port} ({reason})") from None
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _log_to_stderr() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s stnpadim serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
