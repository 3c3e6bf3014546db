"""`torchrun -m stnpadim_ext fit|score|eval`: 2 and 3 CPU processes (gloo on 127.0.0.1) give
one process's outputs; the output rules apply once; bad input is reported once; a rank that
dies stops the others with one line naming it; nothing is half-written.

Every run is a real torchrun subprocess (one thread per rank on this 2-core machine, as
the session splits the cores); data: a tiny synthetic set (64 px).
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from stnpadim_ext.cli import main
from stnpadim_ext.models.padim.serialization import read_model_file

HERE = Path(__file__).resolve().parent
SIZE = 64
FIT = ["--stn", "none", "--image-size", str(SIZE), "--batch-size", "2"]
TIMING_KEYS = ("fit_seconds", "images_per_second")


@dataclass
class Run:
    returncode: int
    stdout: list[str]   # per local rank
    stderr: list[str]   # per local rank
    launcher: str       # torchrun's own stderr

    def errors(self) -> list[tuple[int, str]]:
        """(rank, line) of every `stnpadim: error:` line any rank printed."""
        return [(rank, line) for rank, text in enumerate(self.stderr) for line in text.splitlines()
                if line.startswith("stnpadim: error:")]

    def exit_codes(self) -> dict[int, int]:
        """{rank: exit code} of the ranks torchrun reports as failed."""
        found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", self.launcher)
        return {int(rank): int(code) for rank, code in found}


def torchrun(world: int, argv: list, tmp_path: Path, script: Path | None = None, env: dict | None = None,
             monitor_interval: float = 0.1) -> Run:
    """Runs `stnpadim ARGV` (or `script ARGV`) under torchrun with `world` processes."""
    logs = Path(tmp_path) / f"torchrun-logs-{len(list(Path(tmp_path).glob('torchrun-logs-*')))}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               "--log-dir", str(logs), "--redirects", "3", "--monitor-interval", str(monitor_interval)]
    command += [str(script)] if script else ["-m", "stnpadim_ext"]
    command += [str(a) for a in argv]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    attempt = sorted(logs.glob("*/attempt_0"))
    assert attempt, result.stderr
    read = [(attempt[0] / str(r) / name) for r in range(world) for name in ("stdout.log", "stderr.log")]
    texts = [p.read_text() if p.exists() else "" for p in read]
    return Run(result.returncode, texts[0::2], texts[1::2], result.stderr)


def one_process(argv: list) -> int:
    """`stnpadim ARGV` in this process with one intra-op thread, as each rank has here.

    Per-image results are bit-identical for the same thread count only: oneDNN's
    convolutions split their sums by thread (a 2-thread run's maps differ from a 1-thread
    run's by ~1e-6 relative).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(root), "--categories", "fabric", "--image-size", str(SIZE),
                 "--n-train", "12", "--n-test-good", "4", "--n-test-defect", "1"]) == 0
    return root


@pytest.fixture(scope="module")
def model_file(data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "fabric.padim"
    assert one_process(["fit", "--data", data, "--category", "fabric", *FIT, "--out", path]) == 0
    return path


def image_folders(data: Path) -> list[Path]:
    """The test set's folders (good and each defect type)."""
    return sorted(p for p in (data / "fabric" / "test").iterdir() if p.is_dir())


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------
# Same results as one process


@pytest.mark.parametrize("world, extra", [(2, ["--masks"]), (3, [])], ids=["2-masks", "3"])
def test_score_equals_one_process_bit_for_bit(data, model_file, tmp_path, world, extra):
    """Each rank scores whole batches, as one process does: the same scores.csv and the
    same heatmap (and mask) PNGs, byte for byte."""
    one, many = tmp_path / "one", tmp_path / "many"
    argv = ["score", "--model", model_file, *image_folders(data), "--batch-size", "2", *extra]
    assert one_process(argv + ["--out", one]) == 0
    run = torchrun(world, argv + ["--out", many], tmp_path)
    assert run.returncode == 0, (run.launcher, run.stderr)
    want, got = files(one), files(many)
    images = sum(len(list(d.iterdir())) for d in image_folders(data))
    assert len(want) == 1 + images * (2 if extra else 1)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], name
    # Rank 0 alone speaks: one summary line.
    assert "scored" in run.stdout[0] and not any(run.stdout[1:]), run.stdout
    assert not run.errors()


def test_score_of_an_uncalibrated_model_with_a_report(data, tmp_path):
    """Without a threshold the heatmap colours span the maps of all ranks (reduced over the
    ranks); the HTML report gathers every map on rank 0."""
    model = tmp_path / "two_images.padim"
    root = tmp_path / "tiny"
    shutil.copytree(data / "fabric", root / "fabric")
    for extra in sorted((root / "fabric" / "train" / "good").iterdir())[2:]:
        extra.unlink()
    assert one_process(["fit", "--data", root, "--category", "fabric", *FIT, "--out", model]) == 0
    one, many = tmp_path / "one", tmp_path / "many"
    argv = ["score", "--model", model, *image_folders(data), "--batch-size", "2"]
    assert one_process(argv + ["--out", one]) == 0
    run = torchrun(2, argv + ["--out", many, "--report", tmp_path / "report"], tmp_path)
    assert run.returncode == 0, (run.launcher, run.stderr)
    assert "uncalibrated" in run.stdout[0]
    assert files(many) == files(one)
    html = (tmp_path / "report" / "index.html").read_text()
    assert html.count("<img") >= sum(len(list(d.iterdir())) for d in image_folders(data))


def test_fit_equals_one_process(data, model_file, tmp_path):
    out = tmp_path / "two.padim"
    run = torchrun(2, ["fit", "--data", data, "--category", "fabric", *FIT, "--out", out], tmp_path)
    assert run.returncode == 0, (run.launcher, run.stderr)
    assert "fitted PaDiM" in run.stdout[0] and not run.stdout[1]
    (want_config, want), (got_config, got) = read_model_file(model_file), read_model_file(out)
    assert got.keys() == want.keys()
    for name, value in want.items():
        if name.startswith("gaussian."):  # summation order of the float64 statistics only
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got[name], value), name
    want_cal, got_cal = want_config.pop("calibration"), got_config.pop("calibration")
    assert got_config == want_config
    assert got_cal["n"] == want_cal["n"] and got_cal["alpha"] == want_cal["alpha"]
    assert got_cal["threshold"] == pytest.approx(want_cal["threshold"], rel=1e-5)
    assert not list(tmp_path.glob(".two.padim*"))  # no temporary left


def _same_results(got, want, path="") -> None:
    """Equal JSON documents, floats to 1e-5 relative, timing keys skipped."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            if key not in TIMING_KEYS:
                _same_results(got[key], want[key], f"{path}/{key}")
    elif isinstance(want, float) and not math.isnan(want):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), path
    else:
        assert got == want, path


def test_eval_equals_one_process(data, model_file, tmp_path):
    """eval fits (sharded), gathers every test image's scores and maps, then computes
    AUROC & co. over all of them: one process's numbers; --model likewise."""
    for extra in (FIT, ["--model", model_file, "--batch-size", "2"]):
        one, many = tmp_path / "one.json", tmp_path / "many.json"
        one.unlink(missing_ok=True)
        many.unlink(missing_ok=True)
        argv = ["eval", "--data", data, "--category", "fabric", *extra]
        assert one_process(argv + ["--json", one]) == 0
        run = torchrun(2, argv + ["--json", many], tmp_path)
        assert run.returncode == 0, (run.launcher, run.stderr)
        want, got = json.loads(one.read_text()), json.loads(many.read_text())
        assert want["categories"]["fabric"]["image_auroc"] is not None
        _same_results(got, want)


@pytest.mark.slow
def test_eval_with_an_stn_and_its_baselines_equals_one_process(tmp_path):
    """The four arms (PaDiM, PaDiM+aug, STN+PaDiM, oracle): rank 0's STN on every rank, the
    posed views and the oracle's known poses sharded, calibration and test scores gathered."""
    root = tmp_path / "data"
    assert main(["synth", "--out", str(root), "--categories", "part_drift", "--image-size", str(SIZE),
                 "--n-train", "12", "--n-test-good", "3", "--n-test-defect", "1"]) == 0
    one, many = tmp_path / "one.json", tmp_path / "many.json"
    argv = ["eval", "--data", root, "--category", "part_drift", "--image-size", str(SIZE), "--stn", "reconstruct",
            "--stn-epochs", "1", "--accept-weak-stn", "--batch-size", "4"]
    assert one_process(argv + ["--json", one]) == 0
    run = torchrun(2, argv + ["--json", many], tmp_path)
    assert run.returncode == 0, (run.launcher, run.stderr)
    want, got = json.loads(one.read_text()), json.loads(many.read_text())
    assert {"baseline", "augmented", "oracle"} <= want.keys()
    _same_results(got, want)


# ----------------------------------------------------------------------------------------
# Output rules, bad input, faults


def test_output_rules_apply_once_before_any_rank_works(data, model_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.csv").write_text("my own notes\n")
    argv = ["score", "--model", model_file, *image_folders(data), "--out", out]
    run = torchrun(2, argv, tmp_path)
    assert run.returncode != 0
    [(rank, line)] = run.errors()  # reported once, by rank 0 which checked
    assert rank == 0 and str(out / "scores.csv") in line and "--force" in line, line
    assert run.exit_codes() == {0: 2, 1: 2}, run.launcher
    assert files(out) == {"scores.csv": b"my own notes\n"}  # nothing written, nothing removed
    run = torchrun(2, argv + ["--force"], tmp_path)
    assert run.returncode == 0, (run.launcher, run.stderr)
    with open(out / "scores.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == sum(len(list(d.iterdir())) for d in image_folders(data))


def test_bad_image_in_one_ranks_share_is_reported_once(data, model_file, tmp_path):
    """Batch 1 (rank 1's) holds a file that is no image: rank 1 says so, once; every rank
    exits 2; nothing is written."""
    folder = tmp_path / "images"
    folder.mkdir()
    good = sorted((data / "fabric" / "test" / "good").iterdir())
    for i, name in enumerate(["0", "1", "3", "4"]):
        shutil.copy(good[i % len(good)], folder / f"{name}.png")
    (folder / "2.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    run = torchrun(2, ["score", "--model", model_file, folder, "--out", out, "--batch-size", "2"], tmp_path)
    assert run.returncode != 0
    [(rank, line)] = run.errors()
    assert rank == 1 and "2.png" in line, line
    assert "Traceback" not in "".join(run.stderr)
    assert set(run.exit_codes().values()) == {2}, run.launcher
    assert not out.exists() or files(out) == {}


@pytest.mark.parametrize("monitor_interval", [0.1, 12.0], ids=["torchrun-stops-them", "they-find-out"])
def test_a_rank_that_dies_stops_the_others_with_one_line_naming_it(data, model_file, tmp_path, monitor_interval):
    """Rank 1 is SIGKILLed at its second batch. torchrun (checking its workers every 0.1 s)
    sends the others SIGTERM; checking every 12 s, as a remote node's torchrun would be
    late, it leaves them to find out by themselves (a broken connection, a heartbeat that
    stopped). Either way each says which rank stopped, and exits 1."""
    out = tmp_path / "out"
    argv = ["score", "--model", model_file, *image_folders(data), "--out", out, "--batch-size", "1"]
    run = torchrun(3, argv, tmp_path, script=HERE / "torchrun_rank.py", env={"STNPADIM_TEST_KILL_RANK": "1"},
                   monitor_interval=monitor_interval)
    assert run.returncode != 0
    errors = run.errors()
    assert sorted(rank for rank, _ in errors) == [0, 2], (errors, run.stderr)
    for _, line in errors:
        assert "rank 1 (pid" in line and "stopped" in line, line
    assert run.exit_codes() == {0: 1, 1: -9, 2: 1}, run.launcher
    assert "Traceback" not in run.stderr[0] + run.stderr[2]
    assert not out.exists() or files(out) == {}  # no heatmap, no scores.csv, no staging folder


def test_a_rank_that_hangs_stops_the_others_after_the_collective_timeout(data, model_file, tmp_path):
    """Rank 1 stops at its second batch, alive: its heartbeat goes on, so nobody can say it
    died. The others wait in their next collective for STNPADIM_DIST_TIMEOUT seconds (5
    here), then each says so in one line and exits 1; torchrun then ends rank 1. No hang,
    nothing written."""
    out = tmp_path / "out"
    argv = ["score", "--model", model_file, *image_folders(data), "--out", out, "--batch-size", "1"]
    start = time.monotonic()
    run = torchrun(3, argv, tmp_path, script=HERE / "torchrun_rank.py",
                   env={"STNPADIM_TEST_HANG_RANK": "1", "STNPADIM_DIST_TIMEOUT": "5"})
    assert time.monotonic() - start < 120  # not the hung rank's 600 s
    assert run.returncode != 0
    errors = run.errors()
    assert sorted(rank for rank, _ in errors) == [0, 2], (errors, run.stderr)
    for _, line in errors:
        assert "collective operation failed" in line and "STNPADIM_DIST_TIMEOUT" in line, line
    codes = run.exit_codes()
    assert codes.get(0) == 1 and codes.get(2) == 1 and codes.get(1, 0) != 0, run.launcher
    assert not out.exists() or files(out) == {}


@pytest.mark.parametrize("case", ["not-distributed", "bad-option", "missing-model"])
def test_errors_every_rank_finds_are_reported_once(data, tmp_path, case):
    image = next((data / "fabric" / "test" / "good").iterdir())
    argv, names = {
        "not-distributed": (["synth", "--out", tmp_path / "synth"], "runs in one process"),
        "bad-option": (["score", "--model", "m.padim", "x.png", "--batch-size", "0"], "--batch-size"),
        "missing-model": (["score", "--model", tmp_path / "none.padim", image], "none.padim"),
    }[case]
    run = torchrun(2, argv, tmp_path)
    assert run.returncode != 0
    [(rank, line)] = run.errors()
    assert names in line, line
    assert rank == 0 or case == "missing-model"  # found while running: the first to post says it
    assert set(run.exit_codes().values()) == {2}, run.launcher
    assert not (tmp_path / "synth").exists()
