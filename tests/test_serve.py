"""`stnpadim serve` as a user runs it: a real server process on 127.0.0.1 (a free port
picked by the server, read from its start line) and a real HTTP client (httpx).

Model: efficientnet_lite0 at 64 px fitted on a tiny synthetic set. Expected scores come
from the same model file scored offline one image at a time (`predict_batch`, B=1), which
is what a lone request gets, so sequential answers must match it exactly; answers from
mixed batches may differ in the 7th digit (the backbone's arithmetic depends on the batch
size), so concurrent answers are matched within 1e-5 relative while the test images'
scores lie further apart than that.

Servers are started by tests/serve_harness.py's ServeProcess; faults (a failing or slow
model call) are injected by running that file, the same CLI with `predict_batch` patched.
"""
from __future__ import annotations

import asyncio
import base64
import csv
import io
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from serve_harness import ServeProcess

from stnpadim_ext.cli import main
from stnpadim_ext.data.images import decode_image

httpx = pytest.importorskip("httpx", reason='the serve extra is not installed: pip install "stnpadim[serve]"')
pytest.importorskip("fastapi", reason='the serve extra is not installed: pip install "stnpadim[serve]"')
pytest.importorskip("uvicorn", reason='the serve extra is not installed: pip install "stnpadim[serve]"')
pytest.importorskip("prometheus_client", reason='the serve extra is not installed: pip install "stnpadim[serve]"')

SIZE = 64
BODY = "request body"


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(root), "--categories", "fabric", "--seed", "3",
                 "--image-size", str(SIZE), "--n-train", "8", "--n-test-good", "3", "--n-test-defect", "1"]) == 0
    return root


@pytest.fixture(scope="module")
def model_file(data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "fabric.padim"
    assert main(["fit", "--data", str(data), "--category", "fabric", "--stn", "none",
                 "--image-size", str(SIZE), "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def images(data, tmp_path_factory) -> list[Path]:
    """The synthetic test images, flipped copies of them (more distinct scores) and one
    image per mode and format the decoder handles differently, at other sizes."""
    folder = tmp_path_factory.mktemp("images")
    sources = sorted((data / "fabric" / "test").rglob("*.png"))
    paths = []
    for i, source in enumerate(sources):
        pixels = np.asarray(Image.open(source).convert("RGB"))
        paths.append(_save(folder / f"{i:02d}.png", pixels))
        paths.append(_save(folder / f"{i:02d}_flip.png", pixels[:, ::-1]))
    pixels = np.asarray(Image.open(sources[0]).convert("RGB").resize((100, 80)))
    paths.append(_save(folder / "wide.jpg", pixels, quality=90))
    paths.append(_save(folder / "grey.png", pixels.mean(2).astype(np.uint8)))
    paths.append(_save(folder / "rgba.webp", np.dstack([pixels, np.full(pixels.shape[:2], 200, np.uint8)]),
                       lossless=True))
    Image.fromarray((pixels[..., 1].astype(np.uint16) * 257)).save(folder / "deep.png")  # 16-bit grey
    paths.append(folder / "deep.png")
    return paths


def _save(path: Path, pixels: np.ndarray, **options) -> Path:
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, **options)
    return path


@pytest.fixture(scope="module")
def expected(model_file, images) -> dict[Path, float]:
    """Offline scores, one image per call (what a lone request gets)."""
    from stnpadim_ext.models.padim import load

    model = load(model_file, device="cpu", progress=False)
    scores = {}
    for path in images:
        image, _ = decode_image(path, model.image_size)
        scores[path] = float(model.predict_batch(image[None])[0][0])
    values = sorted(scores.values())
    # Distinct enough that a mixed-up answer cannot pass for the right one.
    assert min(b / a - 1 for a, b in zip(values[:-1], values[1:], strict=True)) > 1e-4, values
    return scores


@pytest.fixture(scope="module")
def server(model_file):
    """The service with its default settings, shared by the module's plain tests."""
    srv = ServeProcess(model_file)
    yield srv
    code = srv.stop()
    assert code == 0, srv.log
    assert "Traceback" not in srv.log, srv.log


def post(url: str, body: bytes, query: str = "", timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/v1/score{query}", content=body, timeout=timeout)


def png_bytes(value: int, size: int = SIZE) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def cli_error(capsys, model_file: Path, path: Path, tmp_path: Path) -> str:
    """The message `stnpadim score` gives for `path`, with the path put as the service names it."""
    assert main(["score", "--model", str(model_file), str(path), "--out", str(tmp_path / "out")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    return line.removeprefix("stnpadim: error: ").replace(str(path), BODY)


# ---------------------------------------------------------------------------------- answers


def test_answers_equal_stnpadim_score(server, model_file, images, tmp_path, capsys):
    """Scores, decisions, heatmap overlays and masks: bit for bit what `score` writes (one
    image per batch on both sides), for every mode and format in `images`."""
    out = tmp_path / "cli"
    assert main(["score", "--model", str(model_file), *map(str, images), "--out", str(out), "--masks",
                 "--batch-size", "1"]) == 0
    capsys.readouterr()
    with open(out / "scores.csv", newline="") as f:
        rows = {Path(row["image"]).name: row for row in csv.DictReader(f)}
    anomalous = set()
    for path in images:
        response = post(server.url, path.read_bytes(), "?heatmap=1&mask=1")
        assert response.status_code == 200, response.text
        answer, row = response.json(), rows[path.name]
        assert f"{answer['score']:.6g}" == row["score"]
        assert f"{answer['normalized_score']:.6g}" == row["normalized_score"]
        assert str(answer["anomalous"]).lower() == row["anomalous"]
        assert answer["normalized_score"] == pytest.approx(answer["score"] / answer["threshold"])
        assert answer["model"].startswith("fabric.padim@")
        anomalous.add(answer["anomalous"])
        for key, name in (("heatmap_png", row["heatmap"]),
                          ("mask_png", row["heatmap"].replace("_heatmap.png", "_mask.png"))):
            served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer[key]))))
            written = np.asarray(Image.open(out / name))
            assert served.shape == written.shape and np.array_equal(served, written), (path.name, key)
    assert anomalous == {True, False}  # both decisions were compared


def test_plain_answer_has_no_pictures(server, images, expected):
    answer = post(server.url, images[0].read_bytes()).json()
    assert set(answer) == {"score", "normalized_score", "anomalous", "threshold", "model"}
    assert answer["score"] == expected[images[0]]


def test_model_health_and_metrics_endpoints(server, model_file):
    import hashlib

    info = httpx.get(server.url + "/v1/model", timeout=30).json()
    assert info["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert info["backbone"] == "efficientnet_lite0" and info["image_size"] == [SIZE, SIZE]
    assert info["stn"] is None and info["false_reject_rate"] == 0.01 and info["threshold"] > 0
    assert info["serving"] == {"max_batch": 32, "max_wait_ms": 10.0, "max_queue": 256, "max_image_mb": 50.0}
    assert httpx.get(server.url + "/healthz", timeout=30).json()["status"] == "ok"
    response = httpx.get(server.url + "/metrics", timeout=30)
    assert response.headers["content-type"].startswith("text/plain")
    for name in ("stnpadim_requests_total", "stnpadim_request_seconds_bucket", "stnpadim_batch_size_bucket",
                 "stnpadim_queue_depth", "stnpadim_images_scored_total"):
        assert name in response.text


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")  # newer Starlette's nudge
def test_uncalibrated_model_answers_scores_and_heatmaps_only(model_file, images, tmp_path, capsys):
    """In process (FastAPI's TestClient): no threshold, no decisions, no mask; the heatmap's
    colours span the map's own range, as `score` draws one file."""
    from fastapi.testclient import TestClient
    from test_bad_input import edit_model

    from stnpadim_ext.serve.app import Limits, build_app
    from stnpadim_ext.serve.scoring import Scorer

    path = edit_model(model_file, tmp_path / "old.padim", config=lambda cfg: cfg.update(calibration=None))
    out = tmp_path / "cli"
    assert main(["score", "--model", str(path), str(images[0]), "--out", str(out)]) == 0
    capsys.readouterr()
    with TestClient(build_app(Scorer.load(path, "cpu"), Limits())) as client:
        answer = client.post("/v1/score?heatmap=1", content=images[0].read_bytes()).json()
        refused = client.post("/v1/score?mask=1", content=images[0].read_bytes())
    assert answer["threshold"] is None and answer["normalized_score"] is None and answer["anomalous"] is None
    with open(out / "scores.csv", newline="") as f:
        assert f"{answer['score']:.6g}" == next(csv.DictReader(f))["score"]
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["heatmap_png"]))))
    assert np.array_equal(served, np.asarray(Image.open(out / f"{images[0].stem}_heatmap.png")))
    assert refused.status_code == 400 and "calibrated model" in refused.json()["detail"]


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", ["not_an_image", "gif", "bomb", "nan_tiff", "empty"])
def test_bad_images_get_400_with_the_cli_message(server, model_file, tmp_path, capsys, case):
    from test_bad_input import bomb_png, float_tiff

    path = tmp_path / {"not_an_image": "x.png", "gif": "x.png", "bomb": "x.png", "nan_tiff": "x.tif",
                       "empty": "x.png"}[case]
    if case == "not_an_image":
        path.write_bytes(b"just some text, not pixels\n" * 10)
    elif case == "gif":
        Image.new("P", (SIZE, SIZE)).save(path, format="GIF")
    elif case == "bomb":
        bomb_png(path)
    elif case == "nan_tiff":
        float_tiff(path, float("nan"))
    else:
        path.write_bytes(b"")
    before = server.metrics()
    response = post(server.url, path.read_bytes())
    assert response.status_code == 400
    assert response.json() == {"detail": cli_error(capsys, model_file, path, tmp_path)}
    assert "Traceback" not in response.text
    after = server.metrics()
    assert after['stnpadim_requests_total{status="400"}'] == before.get('stnpadim_requests_total{status="400"}', 0) + 1
    assert after["stnpadim_images_scored_total"] == before["stnpadim_images_scored_total"]


def test_bad_query_and_unknown_paths(server, images):
    response = post(server.url, images[0].read_bytes(), "?heatmap=maybe")
    assert response.status_code == 400 and "heatmap" in response.json()["detail"]
    assert httpx.get(server.url + "/v1/nothing", timeout=30).status_code == 404
    assert httpx.get(server.url + "/v1/score", timeout=30).status_code == 405


# ---------------------------------------------------------------------------------- load


async def _clients(url: str, paths: list[Path], clients: int, per_client: int) -> list[tuple[Path, httpx.Response]]:
    bodies = {path: path.read_bytes() for path in paths}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def one(c: int) -> list:
            out = []
            for k in range(per_client):
                path = paths[(c * per_client + k) % len(paths)]
                out.append((path, await client.post(url + "/v1/score", content=bodies[path])))
            return out

        return [item for chunk in await asyncio.gather(*(one(c) for c in range(clients))) for item in chunk]


def test_64_concurrent_clients_each_get_their_own_answer(server, images, expected):
    before = server.metrics()
    answers = asyncio.run(_clients(server.url, images, clients=64, per_client=8))
    assert len(answers) == 512
    for path, response in answers:
        assert response.status_code == 200, response.text
        assert response.json()["score"] == pytest.approx(expected[path], rel=1e-5), path.name
    after = server.metrics()
    scored = after["stnpadim_images_scored_total"] - before["stnpadim_images_scored_total"]
    batches = after["stnpadim_batch_size_count"] - before["stnpadim_batch_size_count"]
    assert scored == 512  # each request scored once
    # Batches were shared (how much depends on the machine's load: 1.9 images per batch at a
    # load average of 8 on 2 cores; the batcher's own tests check the batching rules).
    assert batches < 512


def test_memory_stays_flat_over_2000_requests(server, images):
    paths = images[:6]  # 64 px PNGs: a leaked body or map per request would show

    def burst(n):
        answers = asyncio.run(_clients(server.url, paths, clients=8, per_client=n // 8))
        assert all(response.status_code == 200 for _, response in answers)

    burst(400)  # warm-up: allocator pools, thread stacks
    start = server.rss_mb()
    burst(1600)
    growth = server.rss_mb() - start
    # 1600 leaked bodies (~12 KB) or maps (8 KB) would add 13-20 MB.
    assert growth < 8, f"RSS grew by {growth:.1f} MB over 1600 requests"
    assert server.metrics()["stnpadim_queue_depth"] == 0


# ---------------------------------------------------------------------------------- overload


@pytest.fixture(scope="module")
def small(model_file):
    """A small queue (4), small batches (2), a slow model call (0.1 s) and a 0.5 MB body limit."""
    srv = ServeProcess(model_file, "--max-queue", "4", "--max-batch", "2", "--max-wait-ms", "20",
                 "--max-image-mb", "0.5", env={"STNPADIM_TEST_DELAY": "0.1"}, faults=True)
    yield srv
    assert srv.stop() == 0, srv.log
    assert "Traceback" not in srv.log, srv.log


def test_body_over_the_limit_gets_413(small, images):
    image = images[0].read_bytes()
    big = image + b"\0" * (2 ** 20)  # a valid PNG with trailing bytes, over 0.5 MB
    response = post(small.url, big)
    assert response.status_code == 413 and "0.5 MB" in response.json()["detail"]

    def chunks():  # no Content-Length: refused while streaming
        for _ in range(64):
            yield b"\0" * 2 ** 14

    assert httpx.post(small.url + "/v1/score", content=chunks(), timeout=60).status_code == 413
    assert post(small.url, image).status_code == 200  # and the service goes on
    assert small.metrics()['stnpadim_requests_total{status="413"}'] == 2


def test_overload_gets_503_and_every_request_one_answer(small, images, expected):
    async def clients():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            async def one(i):
                path, refused, retry_after = images[i % len(images)], 0, set()
                while True:
                    response = await client.post(small.url + "/v1/score", content=path.read_bytes())
                    if response.status_code != 503:
                        return path, response, refused, retry_after
                    refused += 1
                    retry_after.add(response.headers.get("retry-after"))
                    await asyncio.sleep(0.2)  # shorter than Retry-After: keeps the test quick

            return await asyncio.gather(*(one(i) for i in range(64)))

    before = small.metrics()
    results = asyncio.run(clients())
    refused = sum(r[2] for r in results)
    assert refused > 0  # the queue of 4 overflowed
    for path, response, _, retry_after in results:
        assert response.status_code == 200, response.text
        assert response.json()["score"] == pytest.approx(expected[path], rel=1e-5)
        assert all(value is not None and int(value) >= 1 for value in retry_after)
    after = small.metrics()

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert delta('stnpadim_requests_total{status="200"}') == 64
    assert delta('stnpadim_requests_total{status="503"}') == refused
    assert delta("stnpadim_images_scored_total") == 64  # nothing lost, nothing scored twice
    assert after["stnpadim_queue_depth"] == 0


# ---------------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def faulty(model_file):
    """Every model call takes 1.5 s; a batch holding an all-13 image raises."""
    srv = ServeProcess(model_file, "--max-wait-ms", "1000", "--max-batch", "8",
                 env={"STNPADIM_TEST_POISON": "13", "STNPADIM_TEST_DELAY": "1.5"}, faults=True)
    yield srv
    srv.kill()


def _concurrently(*calls):
    results = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call()
        except Exception as exc:  # a client-side timeout, for the disconnect tests
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join()
    return results


def test_failing_batch_fails_only_its_requests(faulty, images, expected):
    good = images[0].read_bytes()
    poisoned = _concurrently(lambda: post(faulty.url, png_bytes(13)), lambda: post(faulty.url, good),
                             lambda: post(faulty.url, good))
    for response in poisoned:  # one batch: all three fail, with one line and no traceback
        assert response.status_code == 500
        assert "batch" in response.json()["detail"] and "Traceback" not in response.text
    after = _concurrently(lambda: post(faulty.url, good), lambda: post(faulty.url, images[1].read_bytes()))
    assert [r.status_code for r in after] == [200, 200]  # the service goes on
    assert after[0].json()["score"] == pytest.approx(expected[images[0]], rel=1e-5)
    assert "injected fault" in faulty.log and "Traceback" in faulty.log  # logged, with its traceback
    assert httpx.get(faulty.url + "/healthz", timeout=30).status_code == 200


def test_client_disconnect_is_dropped_without_harming_its_batch(faulty, images, expected):
    before = faulty.metrics()
    # Queued alone, gone before its batch forms (after 1 s): never scored (had it been, its
    # 1.5 s call would have ended by the time of the check).
    with pytest.raises(httpx.TimeoutException):
        post(faulty.url, images[2].read_bytes(), timeout=0.5)
    time.sleep(3.5)
    middle = faulty.metrics()
    assert middle["stnpadim_images_scored_total"] == before["stnpadim_images_scored_total"]
    # Gone while its batch runs (1 s wait + 1.5 s call): its batch-mate still gets its answer.
    gone, kept = _concurrently(lambda: post(faulty.url, images[2].read_bytes(), timeout=1.8),
                               lambda: post(faulty.url, images[3].read_bytes()))
    assert isinstance(gone, httpx.TimeoutException)
    assert kept.status_code == 200
    assert kept.json()["score"] == pytest.approx(expected[images[3]], rel=1e-5)
    after = faulty.metrics()
    assert after['stnpadim_requests_total{status="499"}'] == before.get('stnpadim_requests_total{status="499"}', 0) + 2
    assert after["stnpadim_images_scored_total"] == middle["stnpadim_images_scored_total"] + 2
    assert after["stnpadim_queue_depth"] == 0


def test_second_sigterm_mid_batch_exits_143(faulty, images):
    """Runs last on `faulty`: stops it."""
    result = []
    client = threading.Thread(target=lambda: result.extend(_concurrently(
        lambda: post(faulty.url, images[0].read_bytes(), timeout=60))))
    client.start()
    _wait_for(lambda: faulty.metrics()["stnpadim_queue_depth"] == 1)  # queued (1 s)
    _wait_for(lambda: faulty.metrics()["stnpadim_queue_depth"] == 0)  # its 1.5 s model call runs
    faulty.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert faulty.stop(signal.SIGTERM) == 143
    client.join(60)
    assert result[0].status_code == 503  # told, not left hanging
    assert "stopped before this image was scored" in result[0].json()["detail"]
    assert "stopped at once by a second SIGTERM" in faulty.log
    assert "Exception in ASGI application" not in faulty.log


def _wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------- shutdown


def test_sigterm_finishes_queued_requests_then_exits_0(model_file, images, expected):
    srv = ServeProcess(model_file, "--max-wait-ms", "2000")
    try:
        results = []
        client = threading.Thread(target=lambda: results.extend(_concurrently(
            *[(lambda p=p: post(srv.url, p.read_bytes())) for p in images[:3]])))
        client.start()
        _wait_for(lambda: srv.metrics()["stnpadim_queue_depth"] == 3)  # all three wait for their batch
        srv.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(srv.url + "/healthz", timeout=10)
        assert srv.process.wait(120) == 0
        client.join(60)
        assert [r.status_code for r in results] == [200, 200, 200]
        for path, response in zip(images[:3], results, strict=True):
            assert response.json()["score"] == pytest.approx(expected[path], rel=1e-5)
        assert "stopped by SIGTERM after finishing queued work: 3 scoring requests handled, 3 images " \
               "scored" in srv.log
        assert "Traceback" not in srv.log
    finally:
        srv.kill()


# ---------------------------------------------------------------------------------- CLI


def test_start_line_and_localhost_default(server):
    starts = [line for line in server.lines if "listening on" in line]
    assert len(starts) == 1 and "http://127.0.0.1:" in starts[0] and "max batch 32, max wait 10 ms" in starts[0]


def test_taken_port_and_bad_model_are_one_line_errors(model_file, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(model_file), "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("stnpadim: error: --port") and "in use" in err[0]
    missing = tmp_path / "missing.padim"
    assert main(["serve", "--model", str(missing), "--port", "0"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stnpadim: error:")]
    assert len(lines) == 1 and str(missing) in lines[0]
    assert main(["serve", "--model", str(model_file), "--max-wait-ms", "-1"]) == 2
    assert "--max-wait-ms" in capsys.readouterr().err


def test_without_the_serve_extra_one_line_says_how_to_install(model_file, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    assert main(["serve", "--model", str(model_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['stnpadim: error: serve needs the optional package fastapi: pip install "stnpadim[serve]"']


def test_serve_modules_do_not_load_fastapi_for_other_commands():
    code = ("import sys; from stnpadim_ext.cli.parser import build_parser; build_parser(); "
            "print(any(m.split('.')[0] in ('fastapi', 'uvicorn', 'prometheus_client') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
    assert torch.__version__  # the package imports torch; the serve extra stays out
