"""PaDiM end to end, ours vs anomalib's PadimModel: resnet18, 256x256, CPU.

    pytest benchmarks/bench_padim.py --benchmark-enable

Both sides run the same resnet18 architecture with the same weights (torchvision's ImageNet
file when it is in torch.hub's cache, else one seeded random init loaded into both) and the
same channel subset, so their maps agree and the comparison is like for like.

- inference: a float batch [32, 3, 256, 256] in [0, 1] on the CPU -> scores and maps on the
  CPU, normalisation included on both sides;
- fit memory: peak resident memory of a fresh process fitting 256 images (streamed from a
  generator, so the input does not count), timing = that process's wall time;
- fit memory flatness: ours for N = 100 and N = 2000 images;
- from files: predict on a folder of 64 1024x1024 PNGs (efficientnet_lite0, 256 px; maps
  back at 1024 px) against anomalib's own folder path (its PredictDataset + DataLoader +
  Padim module: pre-processor, model; same backbone architecture, random weights as timm
  cannot load ours offline, maps at 256 px), and, in the same run, against the same
  images as an in-memory float tensor and the bound decode + model allow on this machine:
  cores / (decode core-seconds + model core-seconds per image), where decode is PIL's full
  decode of one file on one thread and the model's core-seconds are the in-memory
  predict's wall time x cores.

Anchor cases skip when anomalib is not installed (`pip install anomalib`). Under the
default --benchmark-disable every case runs once, as a smoke test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from stnpadim_ext.data.images import decode_workers, list_images, load_image  # noqa: E402
from stnpadim_ext.models.backbones import torchvision_weights_path  # noqa: E402
from stnpadim_ext.models.padim import PaDiM  # noqa: E402

SIZE, BATCH, N_FIT = 256, 32, 256
INFER_CASE = f"padim_infer:resnet18-{SIZE}-B{BATCH}-cpu"
FIT_CASE = f"padim_fit_mem:resnet18-{SIZE}-N{N_FIT}-cpu"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
N_FILES, FILE_SIDE = 64, 1024
FILES_CASE = f"padim_files:efficientnet_lite0-{SIZE}-N{N_FILES}-{FILE_SIDE}px-png-cpu"
# Side-by-side best times of the from-files and inference cases, summarised by the last
# case of each.
_files: dict[str, float] = {}
_infer: dict[str, float] = {}


def resnet18_weights(folder: Path) -> Path:
    """torchvision's ImageNet resnet18 file if cached, else a seeded random init saved once."""
    cached = torchvision_weights_path("resnet18")
    if cached.is_file():
        return cached
    import torchvision

    path = folder / f"random-{cached.name}"
    if not path.is_file():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def batches(n: int, batch_size: int = BATCH, seed: int = 0):
    """n random images in [0, 1], made batch by batch (nothing kept)."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        yield torch.rand(min(batch_size, n - start), 3, SIZE, SIZE, generator=generator)


def build_anomalib(weights: Path, idx: torch.Tensor):
    """anomalib's PadimModel with our resnet18 weights and our channel subset."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from anomalib.models.image.padim.torch_model import PadimModel
    model = PadimModel(backbone="resnet18", layers=["layer1", "layer2", "layer3"], pre_trained=False,
                       n_features=idx.numel())
    state = torch.load(weights, map_location="cpu", weights_only=True)
    extractor = model.feature_extractor.feature_extractor
    missing = set(extractor.state_dict()) - set(state)
    assert not missing, f"timm resnet18 keys not in the torchvision file: {sorted(missing)[:3]}"
    extractor.load_state_dict({k: v for k, v in state.items() if k in extractor.state_dict()})
    model.idx.copy_(idx)
    return model


def anomalib_normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def anomalib_fit(model, images) -> None:
    model.train()
    with torch.no_grad():
        for batch in images:
            model(anomalib_normalise(batch))
    model.fit()
    model.eval()


def anomalib_predict(model, x: torch.Tensor):
    with torch.no_grad():
        out = model(anomalib_normalise(x))
    return out.pred_score.flatten(), out.anomaly_map[:, 0]


# ---------------------------------------------------------------------------- fit worker


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def fit_worker(impl: str, n: int, weights: str) -> dict:
    """Runs in a fresh process: builds the model, fits n streamed images, reports memory."""
    import time

    torch.manual_seed(0)
    ours = PaDiM("resnet18", weights=weights, image_size=SIZE, progress=False, device="cpu")
    model = ours if impl == "ours" else build_anomalib(Path(weights), ours.embedding.idx)
    if impl != "ours":
        del ours
    base = _rss_mb("VmRSS")
    start = time.perf_counter()
    if impl == "ours":
        model.fit(batches(n))
    else:
        anomalib_fit(model, batches(n))
    return {"fit_s": time.perf_counter() - start, "base_rss_mb": base, "peak_rss_mb": _rss_mb("VmHWM")}


def run_fit_worker(impl: str, n: int, weights: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, __file__, "fit-worker", impl, str(n), str(weights)],
                         env=env, check=True, capture_output=True, text=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- fixtures


def _inference_cost(model: PaDiM, x: torch.Tensor) -> tuple[float, float]:
    """(flops, minimal bytes) of one predict: backbone convs + the triangular Mahalanobis."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.embedding(x)
    patches, c = model.gaussian.num_patches, model.n_features
    flops = counter.get_total_flops() + x.shape[0] * patches * c * (c + 1)
    weights = sum(p.numel() * p.element_size() for p in model.embedding.parameters())
    gaussian = sum(t.numel() * t.element_size() for t in model.gaussian.state_dict().values())
    io = x.numel() * 4 + x.shape[0] * x.shape[-2] * x.shape[-1] * 4
    return float(flops), float(weights + gaussian + io)


# ---------------------------------------------------------------------------- inference


def test_infer_ours(benchmark, ours, test_batch):
    benchmark.group = INFER_CASE
    flops, nbytes = _inference_cost(ours, test_batch)
    benchmark.extra_info.update(role="ours", case=INFER_CASE, flops=flops, bytes=nbytes)
    scores, maps = benchmark.pedantic(ours.predict, args=(test_batch,), rounds=5, warmup_rounds=1)
    assert maps.shape == (BATCH, SIZE, SIZE)
    if _record_rate(benchmark, BATCH):
        _infer["float32"] = benchmark.stats.stats.min


def test_infer_anomalib(benchmark, anomalib_model, ours, test_batch):
    benchmark.group = INFER_CASE
    benchmark.extra_info.update(role="anchor", case=INFER_CASE, flops=0.0, bytes=0.0)
    scores, maps = benchmark.pedantic(anomalib_predict, args=(anomalib_model, test_batch),
                                      rounds=5, warmup_rounds=1)
    if _record_rate(benchmark, BATCH):
        _infer["anomalib"] = benchmark.stats.stats.min
    # Like for like: same weights, same channels, same statistics -> the same maps.
    our_scores, our_maps = ours.predict(test_batch)
    torch.testing.assert_close(our_maps, maps, rtol=2e-2, atol=2e-2 * float(maps.mean()))
    torch.testing.assert_close(our_scores, scores, rtol=2e-2, atol=0.0)


def _record_rate(benchmark, images: int) -> float | None:
    """images/s of the best round (None under --benchmark-disable: no stats then)."""
    if benchmark.stats is None:
        return None
    rate = images / benchmark.stats.stats.min
    benchmark.extra_info["images_per_second"] = rate
    return rate


# ---------------------------------------------------------------------------- from files


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory, request) -> Path:
    """N_FILES seeded 1024x1024 RGB PNGs: gradients + noise (about 1.6 MB each, like MVTec's);
    4 under --benchmark-disable (a smoke test)."""
    folder = tmp_path_factory.mktemp("png1024")
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:FILE_SIDE, 0:FILE_SIDE]
    disabled = request.config._benchmarksession.disabled  # --benchmark-enable overrides the default
    for i in range(4 if disabled else N_FILES):
        phase = rng.uniform(0, 255, 3)
        base = np.stack([ys / 4 + phase[0], xs / 4 + phase[1], (ys + xs) / 8 + phase[2]], 2) % 256
        pixels = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def lite0():
    model = PaDiM("efficientnet_lite0", image_size=SIZE, progress=False, device="cpu")
    return model.fit(batches(32, seed=3))


def _rounds(benchmark) -> int:
    return 1 if benchmark.disabled else 3


def test_files_ours(benchmark, lite0, png_folder):
    benchmark.group = FILES_CASE
    benchmark.extra_info.update(role="ours", case=FILES_CASE, flops=0.0, bytes=0.0)
    scores, maps = benchmark.pedantic(lite0.predict, args=(png_folder,), rounds=_rounds(benchmark),
                                      warmup_rounds=0)
    assert maps.shape == (len(list_images(png_folder)), FILE_SIDE, FILE_SIDE)
    assert torch.isfinite(scores).all()
    _files["files_s"] = benchmark.stats.stats.min if benchmark.stats else float("nan")
    _record_rate(benchmark, maps.shape[0])


def build_anomalib_folder_model():
    """anomalib's Padim module (pre-processor: resize + ImageNet normalisation) with the
    efficientnet_lite0 stages we tap (timm blocks 1, 2, 4: 24/40/112 channels), fitted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from anomalib.models import Padim
    module = Padim(backbone="efficientnet_lite0", layers=["blocks.1", "blocks.2", "blocks.4"],
                   pre_trained=False, n_features=100, post_processor=False, evaluator=False,
                   visualizer=False)
    anomalib_fit(module.model, batches(32, seed=3))
    return module.eval()


def anomalib_folder_predict(module, folder: Path):
    """anomalib's own folder inference: PredictDataset (read_image per file) + DataLoader."""
    from anomalib.data import PredictDataset

    dataset = PredictDataset(folder)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, collate_fn=dataset.collate_fn)
    scores = []
    with torch.no_grad():
        for batch in loader:
            scores.append(module(batch.image).pred_score.flatten())
    return torch.cat(scores)


def test_files_anomalib(benchmark, png_folder):
    pytest.importorskip("anomalib", reason="anomalib is not installed: pip install anomalib")
    module = build_anomalib_folder_model()
    benchmark.group = FILES_CASE
    benchmark.extra_info.update(role="anchor", case=FILES_CASE, flops=0.0, bytes=0.0)
    scores = benchmark.pedantic(anomalib_folder_predict, args=(module, png_folder),
                                rounds=_rounds(benchmark), warmup_rounds=0)
    assert scores.shape == (len(list_images(png_folder)),)
    _files["anomalib_s"] = benchmark.stats.stats.min if benchmark.stats else float("nan")
    _record_rate(benchmark, scores.shape[0])


def test_files_bound(benchmark, lite0, png_folder):
    """The in-memory predict of the same images and the decode + model bound, same run."""
    paths = list_images(png_folder)
    tensor = torch.stack([load_image(p) for p in paths])
    case = f"padim_files_memory:efficientnet_lite0-{SIZE}-N{N_FILES}-{FILE_SIDE}px-cpu"
    benchmark.group = FILES_CASE
    benchmark.extra_info.update(role="memory", case=case)
    benchmark.pedantic(lite0.predict, args=(tensor,), rounds=_rounds(benchmark), warmup_rounds=0)
    del tensor
    decode_s = min(_time(lambda: [Image.open(p).load() for p in paths]) for _ in range(_rounds(benchmark)))
    if benchmark.stats is None:
        return
    cores, n = decode_workers(), len(paths)
    memory_s = benchmark.stats.stats.min
    bound = cores / (decode_s / n + cores * memory_s / n)
    files = n / _files.get("files_s", float("nan"))
    info = {"cores": cores, "decode_per_core_ips": n / decode_s, "memory_ips": n / memory_s,
            "bound_ips": bound, "files_ips": files, "files_over_bound": files / bound,
            "anomalib_files_ips": n / _files.get("anomalib_s", float("nan"))}
    benchmark.extra_info.update(info)
    benchmark.extra_info["summary"] = (
        f"from files {files:.1f} img/s = {files / bound:.2f}x the bound {bound:.1f} img/s "
        f"({cores} cores; PIL decode {info['decode_per_core_ips']:.1f} img/s per core, "
        f"in-memory predict {info['memory_ips']:.1f} img/s); anomalib folder path "
        f"{info['anomalib_files_ips']:.1f} img/s ({files * _files.get('anomalib_s', float('nan')) / n:.2f}x)")


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_infer_ours_bfloat16(benchmark, weights, ours, test_batch):
    """The same predict with the backbone in bfloat16 (oneDNN AMX / AVX512-BF16 kernels where
    the CPU has them), against float32 and anomalib from the cases above."""
    model = PaDiM("resnet18", weights=weights, image_size=SIZE, progress=False, device="cpu",
                  backbone_dtype="bfloat16").fit(batches(64, seed=1))
    case = f"padim_infer_bf16:resnet18-{SIZE}-B{BATCH}-cpu"
    benchmark.group = INFER_CASE
    benchmark.extra_info.update(role="bfloat16", case=case)
    scores, maps = benchmark.pedantic(model.predict, args=(test_batch,), rounds=5, warmup_rounds=1)
    assert maps.shape == (BATCH, SIZE, SIZE) and torch.isfinite(scores).all()
    if _record_rate(benchmark, BATCH):
        best = benchmark.stats.stats.min
        nan = float("nan")
        benchmark.extra_info["summary"] = (
            f"bfloat16 backbone {BATCH / best:.1f} img/s = {_infer.get('float32', nan) / best:.2f}x "
            f"float32, {_infer.get('anomalib', nan) / best:.2f}x anomalib's PadimModel "
            f"(CPU capability {torch.backends.cpu.get_cpu_capability()})")


# ---------------------------------------------------------------------------- fit memory


def _fit_case(benchmark, impl: str, n: int, case: str, role: str, weights: Path) -> dict:
    benchmark.group = case
    result = {}

    def run():
        result.update(run_fit_worker(impl, n, weights))

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(role=role, case=case, flops=0.0, bytes=0.0,
                                peak_rss_mb=result["peak_rss_mb"],
                                peak_over_base_mb=result["peak_rss_mb"] - result["base_rss_mb"],
                                fit_s=result["fit_s"])
    return result


def test_fit_memory_ours(benchmark, weights):
    _fit_case(benchmark, "ours", N_FIT, FIT_CASE, "ours", weights)


def test_fit_memory_anomalib(benchmark, weights):
    pytest.importorskip("anomalib", reason="anomalib is not installed: pip install anomalib")
    _fit_case(benchmark, "anomalib", N_FIT, FIT_CASE, "anchor", weights)


@pytest.mark.parametrize("n", [100, pytest.param(2000, marks=pytest.mark.slow)])
def test_fit_memory_flat_ours(benchmark, weights, n):
    """Peak fit memory must not grow with N: compare the records' peak_rss_mb (N=2000 takes
    about 10 minutes on 2 busy cores, hence slow: deselect with -m "not slow")."""
    case = f"padim_fit_mem:resnet18-{SIZE}-N{n}-cpu"
    _fit_case(benchmark, "ours", n, case, "ours", weights)


if __name__ == "__main__" and sys.argv[1:2] == ["fit-worker"]:
    print(json.dumps(fit_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
