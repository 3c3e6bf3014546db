"""Dynamic batching: requests that arrive together are scored in one model call.

A request first takes a place in the queue (`Batcher.reserve`; refused with `QueueFull`
when `max_queue` places are taken, before its body is even read), then submits its decoded
image. The batch loop, an asyncio task, takes the oldest waiting items as soon as
`max_batch` of them are there, or when the oldest has waited `max_wait` seconds, and runs
the model on them in one call on its own thread, so the event loop keeps accepting and
answering while the model computes. The wait counts from the request's arrival (its body
received), so decoding counts toward it: a lone request is held at most `max_wait` in all,
not decode time plus `max_wait` (plus the batch already running, if any).

Faults stay local: an item whose caller gave up (client gone: its future cancelled) is
dropped when the batch is formed, or its result discarded if its batch already runs; an
exception in the model call fails that batch's callers only (`BatchFailed`), and the
loop goes on with the next batch. `abort` (a forced stop) fails every waiting request
with `Stopped` at once, so each still gets an answer before the process exits.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger("stnpadim.serve")


class QueueFull(Exception):
    """Every place in the queue is taken: the caller should answer 503 and retry later."""


class BatchFailed(Exception):
    """The model call of the batch this request was in raised (traceback in the log)."""


class Stopped(Exception):
    """The service was stopped at once (`Batcher.abort`) before this request was scored."""


class Slot:
    """One place in the queue, held from admission until the item joins a batch (or the
    request ends first); releasing twice is harmless."""

    def __init__(self, batcher: "Batcher"):
        self._batcher = batcher
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._batcher._pending -= 1


@dataclass
class _Job:
    item: Any
    slot: Slot
    future: asyncio.Future
    arrived: float


class ModelThread:
    """One daemon thread that runs submitted calls in order: the model is called from one
    thread only, and a process stopped mid-call (a second SIGTERM) need not wait for it."""

    def __init__(self, name: str = "stnpadim-model"):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._calls.put((fn, args, future))
        return future

    def close(self) -> None:
        """Finishes the calls already submitted, then ends the thread."""
        self._calls.put(None)
        self._thread.join()

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, args, future = call
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # handed to the awaiting request, logged there
                    future.set_exception(exc)


class Batcher:
    """Queues items and runs `run_batch` on batches of them.

    Args:
        run_batch: list of items -> list of results (same length, same order); runs on the
            model thread.
        max_batch: most items per call.
        max_wait: seconds the oldest waiting item may wait for others (0: no waiting).
        max_queue: most requests admitted and not yet in a batch (reading, decoding or
            waiting); beyond it `reserve` raises QueueFull.
        on_batch: optional callback(batch size, seconds) after each successful call.

    Example:
        >>> batcher = Batcher(model_call, max_batch=32, max_wait=0.01, max_queue=256)
        >>> await batcher.start()
        >>> with batcher.reserve() as slot:
        ...     result = await batcher.submit(image, slot)
        >>> await batcher.stop()
    """

    def __init__(self, run_batch: Callable[[list], Sequence], max_batch: int, max_wait: float,
                 max_queue: int, on_batch: Callable[[int, float], None] | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 1, max_wait >= 0; got {max_batch}, "
                             f"{max_queue}, {max_wait}")
        self.run_batch, self.on_batch = run_batch, on_batch
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self._pending = 0  # places taken: admitted, not yet in a batch
        self._jobs: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._model: ModelThread | None = None
        self._stopping = self._aborted = False
        self._running: list[_Job] = []
        self.last_batch_seconds = 0.0

    @property
    def depth(self) -> int:
        """Requests admitted and not yet in a batch."""
        return self._pending

    async def start(self) -> None:
        """Starts the batch loop on the running event loop."""
        self._wakeup = asyncio.Event()
        self._model = ModelThread()
        self._task = asyncio.create_task(self._loop(), name="stnpadim-batcher")

    async def stop(self) -> None:
        """Scores what is queued (without waiting for more), then stops."""
        self._stopping = True
        if self._task is not None:
            self._wakeup.set()
            await self._task
            self._model.close()

    def abort(self) -> None:
        """Fails every queued and running request with Stopped, now (the model call in
        progress is abandoned, not awaited); later submissions fail the same way."""
        self._aborted = self._stopping = True
        for job in [*self._jobs, *self._running]:
            if not job.future.done():
                job.future.set_exception(Stopped())
        self._jobs.clear()
        if self._wakeup is not None:
            self._wakeup.set()

    @contextlib.contextmanager
    def reserve(self) -> Iterator[Slot]:
        """A place in the queue for the block; QueueFull when none is free."""
        if self._pending >= self.max_queue:
            raise QueueFull()
        self._pending += 1
        slot = Slot(self)
        try:
            yield slot
        finally:
            slot.release()

    async def submit(self, item, slot: Slot, arrived: float | None = None):
        """Queues `item` and waits for its result.

        Args:
            item: what run_batch takes, one per request.
            slot: the request's place from `reserve` (released when the item joins a batch).
            arrived: time.monotonic() of the request's arrival, from which max_wait counts
                (default: now).

        Raises:
            BatchFailed: the model call of its batch raised.
            Stopped: the batcher was aborted.
        """
        if self._aborted or (self._stopping and self._task.done()):
            raise Stopped()
        job = _Job(item, slot, asyncio.get_running_loop().create_future(),
                   time.monotonic() if arrived is None else arrived)
        self._jobs.append(job)
        self._wakeup.set()
        # A cancelled wait (client gone) cancels the future: the loop then skips the job.
        return await job.future

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            for job in batch:
                job.slot.release()
            live = [job for job in batch if not job.future.done()]
            if live:
                await self._run(live)

    async def _next_batch(self) -> list[_Job] | None:
        """The next batch: up to max_batch jobs, once that many wait or the oldest has waited
        max_wait; None when stopping with nothing left."""
        while not self._jobs:
            if self._stopping:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = min(job.arrived for job in self._jobs) + self.max_wait
        while len(self._jobs) < self.max_batch and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return [self._jobs.popleft() for _ in range(min(self.max_batch, len(self._jobs)))]

    async def _run(self, batch: list[_Job]) -> None:
        start = time.perf_counter()
        self._running = batch
        try:
            results = await asyncio.wrap_future(self._model.submit(self.run_batch, [j.item for j in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception:
            log.exception("batch of %d failed; its requests get 500, the service goes on", len(batch))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(BatchFailed())
            return
        finally:
            self._running = []
        self.last_batch_seconds = time.perf_counter() - start
        if self.on_batch is not None:
            self.on_batch(len(batch), self.last_batch_seconds)
        for job, result in zip(batch, results, strict=True):
            if not job.future.done():  # its client may have left meanwhile
                job.future.set_result(result)
