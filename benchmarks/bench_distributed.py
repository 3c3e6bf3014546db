"""Scaling of `stnpadim fit` and `stnpadim score` from one process to two (one thread each).

    pytest benchmarks/bench_distributed.py --benchmark-enable -s

One process runs pinned to one CPU (taskset-style affinity, OMP_NUM_THREADS=1); two run
under `torchrun --nproc-per-node 2` pinned to two CPUs, where the session gives each rank
its share of them: one thread. Both time the whole command, start-up (python, torch, the
backbone) included, on the same synthetic images: fit on 512 good 128 px images (~460
fitted, ~52 held out for calibration), score those 512. Under the default
--benchmark-disable each runs once on 16 images at 64 px (a smoke test).

Scaling efficiency = t(1 process) / (2 t(2 processes)): 1.0 is perfect. Start-up does not
scale (every rank imports torch and builds the backbone), so each count is also timed on 4
images, and the summary gives the efficiency of the rest, the work that grows with the
images (what a run over millions of files sees), beside the end-to-end one. It names the
CPU and the load average, measured in the same run; on a shared machine other jobs take
cores from the two ranks, and the efficiency drops with them.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

FULL = {"image_size": 128, "images": 512}
SMOKE = {"image_size": 64, "images": 16}
FEW = 4  # images of the start-up runs
_times: dict[str, dict[int, tuple[float, float]]] = {}


def _cpus() -> list[int]:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        pytest.skip("needs two CPUs this process may run on")
    return cpus[:2]


@pytest.fixture(scope="module")
def setting(request) -> dict:
    return SMOKE if request.config._benchmarksession.disabled else FULL


def _synth(root: Path, setting: dict, images: int) -> Path:
    _stnpadim(1, ["synth", "--out", root, "--categories", "fabric", "--image-size", setting["image_size"],
                  "--n-train", images, "--n-test-good", 0, "--n-test-defect", 0])
    return root


@pytest.fixture(scope="module")
def data(setting, tmp_path_factory) -> Path:
    return _synth(tmp_path_factory.mktemp("scaling"), setting, setting["images"])


@pytest.fixture(scope="module")
def few(setting, tmp_path_factory) -> Path:
    """FEW images: the start-up runs (made only when timing)."""
    return _synth(tmp_path_factory.mktemp("few"), setting, FEW)


@pytest.fixture(scope="module")
def model_file(data, setting, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "fabric.padim"
    _stnpadim(1, ["fit", "--data", data, "--category", "fabric", "--stn", "none", "--image-size",
                  setting["image_size"], "--out", path])
    return path


def _stnpadim(processes: int, argv: list) -> float:
    """Runs `stnpadim ARGV` on `processes` processes, one CPU (and thread) each; seconds."""
    cpus = _cpus()[:processes]
    env = {**os.environ, "STNPADIM_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "stnpadim_ext"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
        "-m", "stnpadim_ext"]
    start = time.perf_counter()
    result = subprocess.run(launcher + [str(a) for a in argv] + ["--no-progress"], env=env, capture_output=True,
                            text=True, timeout=3600, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    return seconds


def _cpu_name() -> str:
    """The CPU's model name and widest vector unit, from /proc/cpuinfo."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
        info = {key.strip(): value.strip() for key, value in info.items()}
        flags = info.get("flags", "").split()
        vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        return f"{info.get('model name', 'unknown CPU')} ({vector})"
    except OSError:
        return platform.processor() or "unknown CPU"


def _measure(benchmark, command: str, processes: int, argv, setting: dict, few_argv) -> None:
    """Times argv(data) once (a whole process launch per round) and, when timing,
    few_argv() (start-up); with both process counts timed, the efficiencies go into the summary."""
    case = f"distributed_{command}:fabric-{setting['images']}x{setting['image_size']}px-cpu"
    benchmark.group = case
    benchmark.extra_info.update(role="ours" if processes == 2 else "anchor", case=case, flops=0.0, bytes=0.0,
                                processes=processes)
    benchmark.pedantic(_stnpadim, args=(processes, argv), rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the smoke run
        return
    times = _times.setdefault(command, {})
    times[processes] = (benchmark.stats.stats.min, _stnpadim(processes, few_argv()))
    if len(times) == 2:
        (one, one_few), (two, two_few) = times[1], times[2]
        efficiency, work = one / (2 * two), (one - one_few) / (2 * (two - two_few))
        benchmark.extra_info.update(efficiency=efficiency, work_efficiency=work)
        benchmark.extra_info["summary"] = (
            f"{setting['images']} images: 1 process {one:.1f} s, 2 processes {two:.1f} s (one thread each), "
            f"speed-up {one / two:.2f}x, scaling efficiency {efficiency:.2f}; without start-up (the same "
            f"on {FEW} images: {one_few:.1f} s / {two_few:.1f} s) {work:.2f}; {_cpu_name()}, load average "
            f"{os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs")


@pytest.mark.parametrize("processes", [1, 2])
def test_fit_scaling(benchmark, request, data, setting, processes, tmp_path):
    def argv(root, out):
        return ["fit", "--data", root, "--category", "fabric", "--stn", "none", "--image-size",
                setting["image_size"], "--out", tmp_path / out]

    _measure(benchmark, "fit", processes, argv(data, "model.padim"), setting,
             lambda: argv(request.getfixturevalue("few"), "few.padim"))


@pytest.mark.parametrize("processes", [1, 2])
def test_score_scaling(benchmark, request, data, setting, model_file, processes, tmp_path):
    def argv(root, out):
        return ["score", "--model", model_file, root / "fabric" / "train" / "good", "--out", tmp_path / out]

    _measure(benchmark, "score", processes, argv(data, "scores"), setting,
             lambda: argv(request.getfixturevalue("few"), "few_scores"))
