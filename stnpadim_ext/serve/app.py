"""The HTTP API (FastAPI): scoring, model information, health and metrics.

    POST /v1/score[?heatmap=1][&mask=1]   body: the image file's bytes
        200 {"score", "normalized_score", "anomalous", "threshold", "model"
             [, "heatmap_png"][, "mask_png"]}   (PNGs base64-encoded)
        400 not an image, a format we do not open, too many pixels, NaN pixels, bad query
        413 body larger than --max-image-mb
        503 queue full (Retry-After: seconds)
        500 the model call of this request's batch failed (traceback in the server log)
        503 also: the service was stopped at once (a second SIGTERM) before scoring it
    GET /v1/model    the model: file, hash, backbone, sizes, threshold, calibration, STN
    GET /healthz     200 {"status": "ok"} (the model is loaded before the port opens)
    GET /metrics     Prometheus text

Every error answer is JSON {"detail": "<one line>"}, never a traceback. A request whose
client disconnects is dropped (recorded as status 499) without touching its batch.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from ..data.images import decode_workers
from ..errors import InputError
from .batcher import Batcher, BatchFailed, QueueFull, Stopped
from .metrics import Metrics
from .scoring import Scorer

log = logging.getLogger("stnpadim.serve")

MB = 2 ** 20
# Status recorded for a request whose client left before its answer (nginx's convention).
CLIENT_GONE = 499
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Limits:
    """Serving settings (the `serve` options)."""

    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_image_mb: float = 50.0

    @property
    def max_bytes(self) -> int:
        return int(self.max_image_mb * MB)


class BodyTooLarge(Exception):
    """The request body exceeds Limits.max_bytes."""


class Service:
    """Scoring requests end to end: admission, body, decode, batch, answer, metrics.

    Args:
        scorer: the loaded model.
        limits: serving settings.
    """

    def __init__(self, scorer: Scorer, limits: Limits):
        self.scorer, self.limits = scorer, limits
        self.batcher = Batcher(scorer.run_batch, limits.max_batch, limits.max_wait_ms / 1000,
                               limits.max_queue, on_batch=self._on_batch)
        self.metrics = Metrics(limits.max_batch, lambda: self.batcher.depth)
        # Decoding and drawing run here, beside the model thread: PIL releases the GIL.
        self.pool = ThreadPoolExecutor(decode_workers(), thread_name_prefix="stnpadim-decode")
        self.answered = self.scored = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.batcher.start()

    def abort(self) -> None:
        """Answers every waiting request with 503 now (a forced stop); callable from any
        thread or a signal handler."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.batcher.abort)

    async def stop(self) -> None:
        """Scores whatever is still queued, then releases the threads."""
        await self.batcher.stop()
        self.pool.shutdown(wait=True)

    def _on_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch(size, seconds)
        self.scored += size

    async def score(self, request: Request) -> Response:
        """POST /v1/score."""
        start = time.perf_counter()
        status, response = await self._score(request)
        self.metrics.request(status, time.perf_counter() - start)
        self.answered += 1
        return response

    async def _score(self, request: Request) -> tuple[int, Response]:
        try:
            heatmap, mask = _flag(request, "heatmap"), _flag(request, "mask")
            if mask and self.scorer.threshold is None:
                raise InputError("mask=1 needs a calibrated model (this one has no threshold: "
                                 "refit it with this version)")
            with self.batcher.reserve() as slot:
                body = await _read_body(request, self.limits.max_bytes)
                work = asyncio.ensure_future(self._answer(body, slot, heatmap, mask))
                if not await _unless_disconnected(work, request):
                    return CLIENT_GONE, Response(status_code=CLIENT_GONE)
                return 200, JSONResponse(work.result())
        except InputError as exc:
            return _error(400, str(exc))
        except BodyTooLarge:
            return _error(413, f"request body is larger than the limit of {self.limits.max_image_mb:g} MB "
                               "(--max-image-mb)")
        except QueueFull:
            # A guess at when a place frees up: the queue's batches at the last batch's pace.
            wait = self.batcher.depth / self.limits.max_batch * self.batcher.last_batch_seconds
            return _error(503, f"queue full ({self.limits.max_queue} requests waiting); retry later",
                          headers={"Retry-After": str(max(1, math.ceil(wait)))})
        except Stopped:
            return _error(503, "the service was stopped before this image was scored; retry")
        except BatchFailed:
            return _error(500, "scoring failed for the batch this image was in; the error is in the "
                               "server log")
        except ClientDisconnect:
            return CLIENT_GONE, Response(status_code=CLIENT_GONE)
        except Exception:
            log.exception("unexpected error while answering /v1/score")
            return _error(500, "internal error; see the server log")

    async def _answer(self, body: bytes, slot, heatmap: bool, mask: bool) -> dict:
        loop, arrived = asyncio.get_running_loop(), time.monotonic()
        decoded = await loop.run_in_executor(self.pool, self.scorer.decode, body)
        score, amap = await self.batcher.submit(decoded, slot, arrived)  # decoding counts toward max-wait
        answer = self.scorer.answer(score)
        if heatmap or mask:
            answer.update(await loop.run_in_executor(self.pool, self.scorer.render, body, amap, heatmap, mask))
        return answer


def build_app(scorer: Scorer, limits: Limits, on_ready=None) -> FastAPI:
    """The FastAPI application serving `scorer`.

    Args:
        scorer: the loaded model.
        limits: serving settings.
        on_ready: optional callback(service) once the batch loop runs, before the first
            request is accepted; `app.state.service` holds the service.
    """
    service = Service(scorer, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        if on_ready is not None:
            on_ready(service)
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="stnpadim", summary="PaDiM anomaly scoring", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.service = service

    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        return await service.score(request)

    @app.get("/v1/model")
    async def model() -> dict:
        return {**scorer.info(), "serving": asdict(limits)}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "model": scorer.name}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback by the server; the client gets one line.
        return JSONResponse({"detail": "internal error; see the server log"}, status_code=500)

    return app


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "0").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InputError(f"query parameter {name}: expected 0 or 1; got {value[:40]!r}")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (BodyTooLarge) as soon as it is known to exceed `limit`:
    from Content-Length before reading, or while streaming a chunked upload."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise BodyTooLarge()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


async def _unless_disconnected(work: asyncio.Future, request: Request) -> bool:
    """Waits for `work`; True when it finished, False (work cancelled) when the client
    disconnected first. Cancels `work` too when this wait itself is cancelled."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        gone.cancel()
    if work.done():
        return True
    work.cancel()  # drops it from the queue, or discards its result if its batch runs
    return False


async def _disconnected(request: Request) -> None:
    # Once the body is read, the next ASGI message is the disconnect (or the end of the
    # response, which comes after `work` anyway).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error(status: int, detail: str, headers: dict | None = None) -> tuple[int, JSONResponse]:
    line = " ".join(detail.split())  # one line, whatever the message held
    return status, JSONResponse({"detail": line}, status_code=status, headers=headers)
