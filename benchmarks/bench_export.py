"""Exported ONNX graph under ONNX Runtime (CPU) vs our torch predict vs anomalib's PadimModel.

    pytest benchmarks/bench_export.py --benchmark-enable -s

One run, one model, one batch: resnet18 at 256 px (bench_padim's weights and channel subset,
so anomalib's side computes the same maps), a float batch [32, 3, 256, 256] in [0, 1] ->
scores and maps on the CPU. ONNX Runtime gets as many intra-op threads as torch. Both
factor storages are timed (packed: what `stnpadim export` writes; dense), and the summary
prints images/s, the ratios and the file sizes, with anomalib's own ONNX export of the same
model where the exporter takes it (else the arithmetic size of what it stores: the float32
inverse covariance [P, C, C] and the mean [C, P] on top of the backbone weights).

The record pair (role ours = ONNX Runtime, anchor = our torch predict) feeds the ratio table
and the gate. anomalib cases skip when anomalib is not installed (`pip install anomalib`).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from bench_padim import (  # benchmarks/ is on sys.path under pytest
    BATCH,
    SIZE,
    _record_rate,
    anomalib_normalise,
    anomalib_predict,
)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# The export extra (onnx, onnxscript and its onnx_ir, onnxruntime): without any of them
# every case here skips, none errors.
for _module in ("onnx", "onnxscript", "onnx_ir"):
    pytest.importorskip(_module, reason='needs the export extra: pip install "stnpadim[export]"')
ort = pytest.importorskip("onnxruntime", reason='needs the export extra: pip install "stnpadim[export]"')
CASE = f"onnx_infer:resnet18-{SIZE}-B{BATCH}-cpu"
_results: dict[str, float] = {}


@pytest.fixture(scope="module")
def onnx_files(ours, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    return {factor: ours.export_onnx(folder / f"{factor}.onnx", factor=factor)
            for factor in ("packed", "dense")}


def _session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _record(benchmark, name: str) -> None:
    rate = _record_rate(benchmark, BATCH)  # None under --benchmark-disable (smoke run)
    if rate is not None:
        _results[name] = rate


def test_infer_torch(benchmark, ours, test_batch):
    benchmark.group = CASE
    benchmark.extra_info.update(role="anchor", case=CASE, flops=0.0, bytes=0.0)
    benchmark.pedantic(ours.predict, args=(test_batch,), rounds=5, warmup_rounds=1)
    _record(benchmark, "torch predict")


@pytest.mark.parametrize("factor", ["packed", "dense"])
def test_infer_onnx(benchmark, ours, onnx_files, test_batch, factor):
    benchmark.group = CASE
    if factor == "packed":
        benchmark.extra_info.update(role="ours", case=CASE, flops=0.0, bytes=0.0)
    session, images = _session(onnx_files[factor]), test_batch.numpy()
    scores, maps = benchmark.pedantic(session.run, args=(None, {"images": images}), rounds=5,
                                      warmup_rounds=1)
    _record(benchmark, f"onnxruntime {factor}")
    expected_scores, expected_maps = ours.predict(test_batch)
    torch.testing.assert_close(torch.from_numpy(maps), expected_maps, rtol=1e-4,
                               atol=1e-4 * float(expected_maps.max()))
    torch.testing.assert_close(torch.from_numpy(scores), expected_scores, rtol=1e-4, atol=0.0)


def test_infer_anomalib(benchmark, anomalib_model, test_batch):
    benchmark.group = CASE
    benchmark.pedantic(anomalib_predict, args=(anomalib_model, test_batch), rounds=5, warmup_rounds=1)
    _record(benchmark, "anomalib PadimModel")


class _AnomalibGraph(torch.nn.Module):
    """anomalib's PadimModel from [0, 1] images to (scores, maps), as its deploy export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(anomalib_normalise(x))
        return out.pred_score.flatten(), out.anomaly_map[:, 0]


def _anomalib_onnx_bytes(model, folder: Path) -> tuple[int, str]:
    """Size of anomalib's model exported by torch.onnx, or the arithmetic size if that fails."""
    path = folder / "anomalib.onnx"
    try:
        program = torch.onnx.export(_AnomalibGraph(model).eval(), (torch.rand(1, 3, SIZE, SIZE),),
                                    dynamo=True, verbose=False)
        program.save(str(path), external_data=False)
        return path.stat().st_size, "torch.onnx export"
    except Exception as exc:  # noqa: BLE001 (any exporter failure: fall back to arithmetic)
        stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        return stored, f"arithmetic (export failed: {type(exc).__name__})"


def test_summary(ours, onnx_files, request, tmp_path):
    """Prints the images/s, ratios and file sizes of this run."""
    mib = 2**20
    lines = [f"{CASE}, {torch.get_num_threads()} threads (shared machine: noisy)"]
    lines += [f"  {name}: {rate:.1f} img/s" for name, rate in _results.items()]
    base = _results.get("onnxruntime packed")
    for other in ("torch predict", "anomalib PadimModel", "onnxruntime dense"):
        if base and other in _results:
            lines.append(f"  onnxruntime packed / {other}: {base / _results[other]:.2f}x")
    for factor, path in onnx_files.items():
        lines.append(f"  ONNX file, {factor} factor: {path.stat().st_size / mib:.1f} MiB")
    if "anomalib PadimModel" in _results:
        model = request.getfixturevalue("anomalib_model")
        size, how = _anomalib_onnx_bytes(model, tmp_path)
        lines.append(f"  anomalib PadimModel ONNX: {size / mib:.1f} MiB ({how})")
    print("\n" + "\n".join(lines))
    assert onnx_files["packed"].stat().st_size < onnx_files["dense"].stat().st_size
    if request.config._benchmarksession.disabled:  # smoke run: nothing was timed
        return
    assert base is not None
