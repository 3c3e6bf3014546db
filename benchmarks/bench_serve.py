"""`stnpadim serve` against offline scoring of the same images, in the same run, CPU.

    pytest benchmarks/bench_serve.py --benchmark-enable

Model: efficientnet_lite0 at 256 px (the defaults), fitted on seeded random images. Images:
N_FILES seeded 512x512 RGB PNGs (gradients + noise), N_REQUESTS per round.

- throughput: in each of 3 rounds, one after the other, (a) offline `model.predict(paths)`
  in this process (decode pipeline, batches of 32, maps back at 512 px), (b) offline
  `score`'s loop (`iter_batches` + `predict_batch`: the service's own work, maps at
  256 px), (c) `predict` in batches of 8 (on a CPU, a batch of 32 can cost more per
  image than a batch of 8: this is the offline rate the service's smaller batches face),
  and the service (a server process with the default settings, --max-batch 32,
  --max-wait-ms 10) with 1, 8 and 32 concurrent httpx clients in this process, each
  sending one file's bytes per request, and 32 clients against a second server with
  --max-batch 8. Rounds interleave the cases so that the load of
  a shared machine falls on all of them alike; each case's best round counts. Reported as
  img/s and as ratios to (a) and (b) (target at 32 clients: >= 0.8x offline predict).
- latency at a fixed rate: requests sent on a fixed schedule at half the offline predict
  rate (open loop: a slow answer does not delay the next request), p50 / p99 from send to
  answer;
- a lone request: one client, a pause before each request so that it is alone; its
  latency against the target max-wait + one batch-of-1 model call, the call's time taken
  from the server's own stnpadim_batch_seconds for the same requests (timed in another
  process, a small call swings several-fold on a shared machine), with the time to
  decode the upload beside it (the service decodes each upload first; that time counts
  toward its max-wait).

The clients share the machine with the server (the offline cases have it to themselves),
so the ratios are if anything pessimistic for the service. Under the default
--benchmark-disable every case runs once on a few images, as a smoke test.
"""
from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from serve_harness import ServeProcess  # noqa: E402

from stnpadim_ext.data.images import decode_image, iter_batches  # noqa: E402
from stnpadim_ext.models.padim import PaDiM  # noqa: E402

httpx = pytest.importorskip("httpx", reason='the serve extra is not installed: pip install "stnpadim[serve]"')
pytest.importorskip("fastapi", reason='the serve extra is not installed: pip install "stnpadim[serve]"')

SIZE, FILE_SIDE, N_FILES, N_REQUESTS = 256, 512, 64, 128
CLIENTS = (1, 8, 32)
MAX_WAIT_MS = 10.0  # the serve default
CASE = f"serve:efficientnet_lite0-{SIZE}-{FILE_SIDE}px-png-cpu"
_rates: dict[str, float] = {}


def _enabled(request) -> bool:
    return not request.config._benchmarksession.disabled


@pytest.fixture(scope="module")
def files(tmp_path_factory, request) -> list[Path]:
    """N_FILES seeded PNGs (4 under --benchmark-disable)."""
    folder = tmp_path_factory.mktemp("png512")
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:FILE_SIDE, 0:FILE_SIDE]
    paths = []
    for i in range(N_FILES if _enabled(request) else 4):
        phase = rng.uniform(0, 255, 3)
        base = np.stack([ys / 2 + phase[0], xs / 2 + phase[1], (ys + xs) / 4 + phase[2]], 2) % 256
        pixels = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def requests_(files, request) -> list[Path]:
    """The files of one round, in order (each file N_REQUESTS / N_FILES times)."""
    n = N_REQUESTS if _enabled(request) else 8
    return [files[i % len(files)] for i in range(n)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    generator = torch.Generator().manual_seed(0)
    model = PaDiM("efficientnet_lite0", image_size=SIZE, progress=False, device="cpu")
    model.fit(torch.rand(16, 3, SIZE, SIZE, generator=generator))
    model.calibrate(torch.rand(8, 3, SIZE, SIZE, generator=generator), false_reject_rate=0.2)
    return model, model.save(tmp_path_factory.mktemp("model") / "bench.padim")


@pytest.fixture(scope="module")
def server(model):
    srv = ServeProcess(model[1])
    yield srv
    assert srv.stop() == 0, srv.log


@pytest.fixture(scope="module")
def server_b8(model):
    """--max-batch 8: on a CPU, batches of 32 can cost more per image than batches of 8."""
    srv = ServeProcess(model[1], "--max-batch", "8")
    yield srv
    assert srv.stop() == 0, srv.log


def _rounds(benchmark) -> int:
    return 1 if benchmark.disabled else 3


async def _burst(url: str, paths: list[Path], clients: int) -> list[float]:
    """All `paths` sent by `clients` concurrent clients (each takes the next file); latencies."""
    bodies = [path.read_bytes() for path in paths]
    latencies, queue = [], iter(range(len(bodies)))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker():
            for i in queue:
                start = time.perf_counter()
                response = await client.post(url + "/v1/score", content=bodies[i])
                assert response.status_code == 200, response.text
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies


def _score_loop(model: PaDiM, paths: list[Path]) -> None:
    for batch in iter_batches(paths, model.batch_size, size=model.image_size):
        model.predict_batch(batch)


def _predict_in_batches_of(model: PaDiM, paths: list[Path], size: int) -> None:
    default, model.batch_size = model.batch_size, size
    try:
        model.predict(paths)
    finally:
        model.batch_size = default


def test_throughput(benchmark, model, server, server_b8, requests_):
    cases = {"offline predict": lambda: model[0].predict(requests_),
             "offline score loop": lambda: _score_loop(model[0], requests_),
             "offline predict, batches of 8": lambda: _predict_in_batches_of(model[0], requests_, 8)}
    cases.update({f"serve {c} clients": (lambda c=c: asyncio.run(_burst(server.url, requests_, c)))
                  for c in CLIENTS})
    cases["serve 32 clients, --max-batch 8"] = lambda: asyncio.run(_burst(server_b8.url, requests_, 32))

    def sweep() -> dict[str, float]:
        rounds = _rounds(benchmark)
        if rounds > 1:
            for run in cases.values():  # warm-up: allocator pools, connections, first calls
                run()
        best = dict.fromkeys(cases, float("inf"))
        for _ in range(rounds):
            for name, run in cases.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
        return best

    benchmark.group = CASE
    best = benchmark.pedantic(sweep, rounds=1)
    rates = {name: len(requests_) / seconds for name, seconds in best.items()}
    benchmark.extra_info.update(case=CASE, images_per_second=rates)
    _rates.update(rates)


def test_serve_latency_at_fixed_rate(benchmark, server, requests_):
    """Open loop at half the offline predict rate (8 img/s when it was not measured)."""
    rate = _rates.get("offline predict", 16.0) / 2
    benchmark.group = CASE
    benchmark.extra_info.update(case=CASE, kind="latency at fixed rate", rate=rate)

    async def schedule():
        bodies = [path.read_bytes() for path in requests_]
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=len(bodies))) as client:
            start = time.perf_counter()

            async def one(i):
                await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
                sent = time.perf_counter()
                response = await client.post(server.url + "/v1/score", content=bodies[i])
                assert response.status_code == 200, response.text
                return time.perf_counter() - sent

            return await asyncio.gather(*(one(i) for i in range(len(bodies))))

    latencies = benchmark.pedantic(lambda: asyncio.run(schedule()), rounds=1)
    p50, p99 = np.percentile(latencies, [50, 99])
    benchmark.extra_info.update(p50_ms=1e3 * p50, p99_ms=1e3 * p99)
    _rates.update(fixed_rate=rate, p50=p50, p99=p99)


def test_lone_request_latency(benchmark, server, model, files):
    """Each request alone; its latency vs max-wait + the server's own batch-of-1 model call
    for the same requests (its stnpadim_batch_seconds), and the decode time beside it."""
    body = files[0].read_bytes()
    size = model[0].image_size

    def alone() -> tuple[list[float], list[float]]:
        decodes, latencies = [], []
        with httpx.Client(timeout=300) as client:
            for _ in range(2 if benchmark.disabled else 20):
                time.sleep(0.3)  # nothing else in flight: the request is alone
                start = time.perf_counter()
                assert client.post(server.url + "/v1/score", content=body).status_code == 200
                latencies.append(time.perf_counter() - start)
                start = time.perf_counter()
                decode_image(body, size)  # what the server does first with the upload
                decodes.append(time.perf_counter() - start)
        return decodes, latencies

    benchmark.group = CASE
    before = server.metrics()
    decodes, latencies = benchmark.pedantic(alone, rounds=1)
    after = server.metrics()
    calls = after["stnpadim_batch_seconds_count"] - before["stnpadim_batch_seconds_count"]
    assert calls == len(latencies)  # each alone in its batch
    call = (after["stnpadim_batch_seconds_sum"] - before["stnpadim_batch_seconds_sum"]) / calls
    decode, lone, mean = statistics.median(decodes), statistics.median(latencies), statistics.mean(latencies)
    bound = MAX_WAIT_MS / 1e3 + call
    benchmark.extra_info.update(case=CASE, lone_p50_ms=1e3 * lone, lone_mean_ms=1e3 * mean,
                                batch1_call_ms=1e3 * call, decode_ms=1e3 * decode, bound_ms=1e3 * bound)
    if benchmark.disabled or "offline predict" not in _rates:
        return
    offline, loop, b8 = (_rates[k] for k in ("offline predict", "offline score loop",
                                             "offline predict, batches of 8"))
    rates = "; ".join(f"{name} {_rates[name]:.1f} img/s = {_rates[name] / offline:.2f}x predict, "
                      f"{_rates[name] / loop:.2f}x score loop, {_rates[name] / b8:.2f}x predict in 8s"
                      for name in _rates if name.startswith("serve"))
    latency = (f"; at {_rates['fixed_rate']:.1f} req/s p50 {1e3 * _rates['p50']:.0f} ms, "
               f"p99 {1e3 * _rates['p99']:.0f} ms") if "p50" in _rates else ""
    benchmark.extra_info["summary"] = (
        f"offline predict {offline:.1f} img/s, score loop {loop:.1f} img/s, predict in batches of 8 "
        f"{b8:.1f} img/s; {rates}{latency}; "
        f"lone request p50 {1e3 * lone:.0f} ms, mean {1e3 * mean:.0f} ms vs max-wait {MAX_WAIT_MS:g} ms "
        f"+ the server's batch-of-1 call {1e3 * call:.0f} ms (mean) = {1e3 * bound:.0f} ms "
        f"({mean / bound:.2f}x; decoding the upload {1e3 * decode:.0f} ms)")
