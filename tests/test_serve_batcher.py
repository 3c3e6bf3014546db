"""The dynamic batcher on its own (no HTTP, no model): a fake model call records batches.

Times here are logic checks with wide margins (a 30 s wait that must not happen), never
measurements.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from stnpadim_ext.serve.batcher import Batcher, BatchFailed, QueueFull, Stopped


class FakeModel:
    """run_batch: records each batch, returns item * 10; raises on "bad"; can be held."""

    def __init__(self):
        self.batches: list[list] = []
        self.release = threading.Event()
        self.release.set()
        self.running = threading.Event()

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.running.set()
        self.release.wait(30)
        if "bad" in items:
            raise RuntimeError("model failed on this batch")
        return [item * 10 for item in items]


async def submit(batcher: Batcher, item):
    with batcher.reserve() as slot:
        return await batcher.submit(item, slot)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_batches_fill_up_to_max_batch_in_order():
    model = FakeModel()

    async def main():
        batcher = Batcher(model, max_batch=4, max_wait=0.05, max_queue=100)
        await batcher.start()
        results = await asyncio.gather(*(submit(batcher, i) for i in range(10)))
        await batcher.stop()
        return results

    assert run(main()) == [i * 10 for i in range(10)]
    assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_full_batch_and_lone_item_do_not_wait_for_more():
    model = FakeModel()

    async def main():
        full = Batcher(model, max_batch=3, max_wait=30.0, max_queue=100)
        await full.start()
        start = time.monotonic()
        assert await asyncio.gather(*(submit(full, i) for i in range(3))) == [0, 10, 20]
        lone = Batcher(model, max_batch=1, max_wait=30.0, max_queue=100)
        await lone.start()
        assert await submit(lone, 5) == 50
        elapsed = time.monotonic() - start
        await full.stop()
        await lone.stop()
        return elapsed

    assert run(main()) < 15  # neither waited for its 30 s max_wait


def test_lone_item_waits_for_company_up_to_max_wait():
    model = FakeModel()

    async def main():
        batcher = Batcher(model, max_batch=8, max_wait=0.3, max_queue=100)
        await batcher.start()
        first = asyncio.ensure_future(submit(batcher, 1))
        await asyncio.sleep(0.05)  # a second request arrives within the first one's wait
        second = asyncio.ensure_future(submit(batcher, 2))
        results = await asyncio.gather(first, second)
        await batcher.stop()
        return results

    assert run(main()) == [10, 20]
    assert model.batches == [[1, 2]]


def test_wait_counts_from_arrival_not_from_queueing():
    """Time a request spent decoding counts toward its max_wait."""
    model = FakeModel()

    async def main():
        batcher = Batcher(model, max_batch=8, max_wait=30.0, max_queue=100)
        await batcher.start()
        start = time.monotonic()
        with batcher.reserve() as slot:
            result = await batcher.submit(7, slot, arrived=time.monotonic() - 31)
        elapsed = time.monotonic() - start
        await batcher.stop()
        return result, elapsed

    result, elapsed = run(main())
    assert result == 70 and elapsed < 15  # its 30 s were already up


def test_queue_full_and_depth():
    async def main():
        batcher = Batcher(FakeModel(), max_batch=4, max_wait=0.01, max_queue=2)
        with batcher.reserve(), batcher.reserve():
            assert batcher.depth == 2
            with pytest.raises(QueueFull):
                with batcher.reserve():
                    pass
        assert batcher.depth == 0
        with batcher.reserve():  # places come back
            assert batcher.depth == 1

    run(main())


def test_cancelled_request_is_dropped_before_its_batch():
    model = FakeModel()

    async def main():
        batcher = Batcher(model, max_batch=8, max_wait=0.3, max_queue=100)
        await batcher.start()
        gone = asyncio.ensure_future(submit(batcher, 1))
        kept = asyncio.ensure_future(submit(batcher, 2))
        await asyncio.sleep(0.05)
        gone.cancel()  # the client left while queued
        result = await kept
        await batcher.stop()
        assert batcher.depth == 0
        return result

    assert run(main()) == 20
    assert model.batches == [[2]]


def test_cancelled_request_in_a_running_batch_leaves_the_others_alone():
    model = FakeModel()
    model.release.clear()

    async def main():
        batcher = Batcher(model, max_batch=2, max_wait=0.0, max_queue=100)
        await batcher.start()
        gone = asyncio.ensure_future(submit(batcher, 1))
        kept = asyncio.ensure_future(submit(batcher, 2))
        await asyncio.to_thread(model.running.wait, 30)
        gone.cancel()  # the client left while its batch runs
        await asyncio.sleep(0.05)
        model.release.set()
        result = await kept
        await batcher.stop()
        return result, gone.cancelled()

    assert run(main()) == (20, True)
    assert model.batches == [[1, 2]]


def test_failing_batch_fails_only_its_own_requests(caplog):
    model = FakeModel()

    async def main():
        batcher = Batcher(model, max_batch=2, max_wait=0.2, max_queue=100)
        await batcher.start()
        first = await asyncio.gather(submit(batcher, "bad"), submit(batcher, 3), return_exceptions=True)
        after = await submit(batcher, 4)  # the loop goes on
        await batcher.stop()
        return first, after

    with caplog.at_level(logging.ERROR, logger="stnpadim.serve"):
        (bad, fellow), after = run(main())
    assert isinstance(bad, BatchFailed) and isinstance(fellow, BatchFailed)
    assert after == 40
    assert model.batches == [["bad", 3], [4]]
    failures = [r for r in caplog.records if "batch of 2 failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None  # logged with its traceback


def test_stop_scores_what_is_queued_without_waiting():
    model = FakeModel()

    async def main():
        batcher = Batcher(model, max_batch=8, max_wait=30.0, max_queue=100)
        await batcher.start()
        tasks = [asyncio.ensure_future(submit(batcher, i)) for i in range(3)]
        await asyncio.sleep(0.05)
        start = time.monotonic()
        await batcher.stop()
        results = await asyncio.gather(*tasks)
        return results, time.monotonic() - start

    results, elapsed = run(main())
    assert results == [0, 10, 20] and model.batches == [[0, 1, 2]]
    assert elapsed < 15  # not the 30 s max_wait


def test_abort_answers_queued_and_running_requests_at_once():
    model = FakeModel()
    model.release.clear()

    async def main():
        batcher = Batcher(model, max_batch=1, max_wait=0.0, max_queue=100)
        await batcher.start()
        tasks = [asyncio.ensure_future(submit(batcher, i)) for i in range(3)]
        await asyncio.to_thread(model.running.wait, 30)  # item 0 runs, 1 and 2 wait
        batcher.abort()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        late = await asyncio.gather(submit(batcher, 9), return_exceptions=True)
        model.release.set()
        return results + late

    results = run(main())
    assert all(isinstance(r, Stopped) for r in results), results
    assert model.batches == [[0]]


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(FakeModel(), max_batch=0, max_wait=0.01, max_queue=1)
