"""ONNX export: ONNX Runtime runs the exported graph with predict's scores, maps and decisions.

Needs the export extra (`pip install -e ".[export]"`: onnx, onnxscript, onnxruntime).
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import stnpadim_ext as sp
from stnpadim_ext.cli import main
from stnpadim_ext.data.images import as_float, iter_batches
from stnpadim_ext.data.mvtec import load_category
from stnpadim_ext.errors import InputError
from stnpadim_ext.models.padim import PaDiM, export
from stnpadim_ext.ops.onnx import base_grid, unpack_index

ort = pytest.importorskip("onnxruntime", reason='needs the export extra: pip install "stnpadim[export]"')
pytest.importorskip("onnxscript", reason='needs the export extra: pip install "stnpadim[export]"')

SIZE = 64


@pytest.fixture(scope="module")
def drift(tmp_path_factory):
    """Synthetic part_drift (test poses drift by up to 30 deg): labels for the AUROC check."""
    from stnpadim_ext.data.synth import make_dataset

    root = tmp_path_factory.mktemp("synth")
    make_dataset(root, categories=["part_drift"], seed=3, image_size=SIZE, n_train=16,
                 n_test_good=6, n_test_defect=2, progress=False)
    category = load_category(root, "part_drift")
    # The loader hands files over as uint8; the graph under test takes float in [0, 1].
    train = as_float(torch.cat(list(iter_batches(category.train_paths, 16))), "cpu")
    test = as_float(torch.cat(list(iter_batches([item.path for item in category.test_items], 64))), "cpu")
    labels = np.array([item.label for item in category.test_items])
    return train, test, labels


def posed_stn(seed: int = 0) -> sp.STN:
    """An untrained STN whose head is perturbed (seeded) so each image gets its own rotation,
    shift and scale: the warp and the warp back are exercised, not the identity."""
    stn = sp.STN()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        stn.head.weight.copy_(0.2 * torch.randn(stn.head.weight.shape, generator=generator))
        stn.head.bias[1] = 0.3
    return stn


def fitted(backbone: str, stn: bool, train: torch.Tensor, calibrate: bool = False) -> PaDiM:
    """Fitted on the first 12 training images; calibrated on the other 4 (when asked) at a
    false-reject rate of 0.25, the lowest 4 images support. Seeded: resnet18 without
    pretrained weights draws them from torch's generator (unseeded, one run in a few put a
    pixel within rounding of the threshold, where ONNX Runtime's mask may differ)."""
    torch.manual_seed(0)
    model = PaDiM(backbone, pretrained=False, image_size=SIZE, stn=posed_stn() if stn else None,
                  progress=False, device="cpu")
    model.fit(train[:12])
    return model.calibrate(train[12:], false_reject_rate=0.25) if calibrate else model


def session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(path: Path, images: np.ndarray) -> dict:
    sess = session(path)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": images}), strict=True))


def assert_relative(actual: np.ndarray, expected: torch.Tensor, tol: float) -> None:
    """Within tol relative to each value, with values near 0 judged against the largest."""
    torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=tol,
                               atol=tol * float(expected.abs().max()))


@pytest.mark.parametrize("stn", [False, True], ids=["padim", "stn"])
@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18"])
def test_onnx_runtime_equals_predict(drift, tmp_path, backbone, stn):
    train, test, labels = drift
    model = fitted(backbone, stn, train, calibrate=True)
    expected = model.decide(test)
    path = model.export_onnx(tmp_path / "model.onnx")

    out = run(path, test.numpy())
    assert list(out) == ["scores", "maps", "normalized_scores", "anomalous", "masks"]
    tol = 1e-3 if stn else 1e-4
    assert_relative(out["maps"], expected.maps, tol)
    assert_relative(out["scores"], expected.scores, tol)
    assert_relative(out["normalized_scores"], expected.normalized_scores, tol)
    assert np.array_equal(out["anomalous"], expected.anomalous.numpy())
    assert np.array_equal(out["masks"], expected.masks.numpy())
    assert 0 < expected.masks.sum() < expected.masks.numel()  # the pixel decisions are not all one way
    assert round(roc_auc_score(labels, out["scores"]), 3) == round(roc_auc_score(labels, expected.scores), 3)
    if stn:  # the STN really moved the images: some input pixels were out of its view
        assert (model.out_of_view_fraction(test) > 0).any()


def test_dynamic_batch_and_metadata(drift, tmp_path):
    import onnx

    train, test, _ = drift
    model = fitted("efficientnet_lite0", False, train)
    path = model.export_onnx(tmp_path / "model.onnx")
    sess = session(path)
    assert sess.get_inputs()[0].shape[1:] == [3, SIZE, SIZE]
    assert [o.name for o in sess.get_outputs()] == ["scores", "maps"]  # no threshold: no decisions
    for batch in (1, 5):
        scores, maps = sess.run(None, {"images": test[:batch].numpy()})
        expected_scores, expected_maps = model.predict(test[:batch])
        assert_relative(maps, expected_maps, 1e-4)
        assert_relative(scores, expected_scores, 1e-4)
    graph = onnx.load(str(path))
    assert graph.producer_name == "stnpadim"
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["backbone"] == "efficientnet_lite0" and meta["input"] == "float32"
    assert meta["image_size"] == f"{SIZE}x{SIZE}" and meta["stn"] == "none"


def test_uint8_input_fixed_batch(drift, tmp_path):
    train, test, _ = drift
    model = fitted("efficientnet_lite0", True, train)
    pixels = (test[:4] * 255).round().to(torch.uint8)
    path = model.export_onnx(tmp_path / "model.onnx", batch_size=4, input_dtype="uint8")
    sess = session(path)
    assert sess.get_inputs()[0].shape == [4, 3, SIZE, SIZE]
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    scores, maps = sess.run(None, {"images": pixels.numpy()})
    expected_scores, expected_maps = model.predict(pixels)
    assert_relative(maps, expected_maps, 1e-3)
    assert_relative(scores, expected_scores, 1e-3)


def test_dense_factor_and_external_weights(drift, tmp_path, monkeypatch):
    train, test, _ = drift
    model = fitted("efficientnet_lite0", False, train)
    packed = model.export_onnx(tmp_path / "packed.onnx")
    monkeypatch.setattr(export, "_SINGLE_FILE_LIMIT", 0)  # as if the graph were over 2 GiB
    dense = model.export_onnx(tmp_path / "dense.onnx", factor="dense")
    assert (tmp_path / "dense.onnx.data").is_file()
    patches, dim = model.gaussian.num_patches, model.n_features
    dense_bytes = dense.stat().st_size + (tmp_path / "dense.onnx.data").stat().st_size
    # The dense file holds P*C*C factor floats; the packed one P*C(C+1)/2 and the int64
    # [C*C] unpacking index.
    saved = patches * dim * (dim - 1) // 2 * 4 - dim * dim * 8
    assert dense_bytes - packed.stat().st_size == pytest.approx(saved, rel=0.005)
    expected = model.predict(test[:3])[1]
    for path in (packed, dense):
        assert_relative(run(path, test[:3].numpy())["maps"], expected, 1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.onnx", "dense.onnx.data", "packed.onnx"]


def constant_only_nodes(onnx_model) -> list[str]:
    """Op types of nodes whose inputs are all initializers or Constant outputs (foldable)."""
    constant = {i.name for i in onnx_model.graph.initializer}
    constant |= {o for n in onnx_model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.op_type for n in onnx_model.graph.node
            if n.op_type != "Constant" and n.input and all(i in constant or not i for i in n.input)]


def test_large_grid_exports_folded(tmp_path):
    """At 192 px the map's upsample+blur operators outgrow the exporter's own folding limit:
    they must still end up as float32 initializers (ONNX Runtime's CPU Conv has no float64)."""
    import onnx

    images = torch.rand(6, 3, 192, 192, generator=torch.Generator().manual_seed(0))
    model = PaDiM(image_size=192, pretrained=False, n_features=8, progress=False, device="cpu")
    model.fit(images[:4])
    path = model.export_onnx(tmp_path / "model.onnx")
    graph = onnx.load(str(path))
    assert constant_only_nodes(graph) == ["Pad"]        # only the packed factor's unpacking
    assert all(i.data_type != onnx.TensorProto.DOUBLE for i in graph.graph.initializer)
    scores, maps = session(path).run(None, {"images": images[4:].numpy()})
    expected_scores, expected_maps = model.predict(images[4:])
    assert_relative(maps, expected_maps, 1e-4)
    assert_relative(scores, expected_scores, 1e-4)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18"])
def test_export_embedding_form_equals_gather(backbone):
    """The embedding's export form (select, nearest upsampling, concat) is bit-equal to the
    gather form predict runs, also where the grids are not multiples (100 px: 25, 13, 7)."""
    embedding = PaDiM(backbone, pretrained=False, image_size=100, progress=False, device="cpu").embedding
    x = torch.rand(2, 3, 100, 100, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        maps = embedding.backbone(((x - embedding.mean) / embedding.std).contiguous(memory_format=torch.channels_last))
        assert [m.shape[-1] for m in maps] == [25, 13, 7]
        torch.testing.assert_close(embedding._concat(maps), embedding(x), rtol=0, atol=0)


def test_lowering_constants_match_torch():
    for align_corners in (False, True):
        theta = torch.eye(2, 3)[None]
        grid = torch.nn.functional.affine_grid(theta, (1, 1, 5, 7), align_corners=align_corners)
        np.testing.assert_allclose(base_grid(5, 7, align_corners)[:, :2], grid.view(-1, 2).numpy(), atol=1e-6)
    packed = torch.arange(1, 11, dtype=torch.float32)[None]                      # C = 4
    dense = np.append(packed.numpy()[0], 0)[unpack_index(4)].reshape(4, 4)
    np.testing.assert_array_equal(dense, sp.PatchGaussian(torch.zeros(1, 4), packed).factor()[0].numpy())


# ---------------------------------------------------------------------------- errors


class ForeignSTN(torch.nn.Module):
    def forward(self, x):
        return x, torch.eye(2, 3).expand(x.shape[0], 2, 3)


def test_unexportable_models(tmp_path):
    with pytest.raises(InputError, match="not fitted"):
        PaDiM(image_size=SIZE, pretrained=False, progress=False).export_onnx(tmp_path / "m.onnx")
    model = PaDiM(image_size=SIZE, pretrained=False, progress=False, stn=ForeignSTN())
    model.fit(torch.rand(4, 3, SIZE, SIZE))
    with pytest.raises(InputError, match="STN of type ForeignSTN"):
        model.export_onnx(tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_bad_export_options(tmp_path):
    model = PaDiM(image_size=SIZE, pretrained=False, progress=False).fit(torch.rand(4, 3, SIZE, SIZE))
    with pytest.raises(InputError, match="input_dtype"):
        model.export_onnx(tmp_path / "m.onnx", input_dtype="float16")
    with pytest.raises(InputError, match="factor"):
        model.export_onnx(tmp_path / "m.onnx", factor="sparse")
    with pytest.raises(InputError, match="batch_size"):
        model.export_onnx(tmp_path / "m.onnx", batch_size=0)
    with pytest.raises(InputError, match="is a folder"):
        model.export_onnx(tmp_path)


@pytest.fixture(scope="module")
def model_file(drift, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "part.padim"
    fitted("efficientnet_lite0", True, drift[0], calibrate=True).save(path)
    return path


def test_cli_export(model_file, drift, tmp_path, capsys):
    out = tmp_path / "part.onnx"
    assert main(["export", "--model", str(model_file), "--out", str(out)]) == 0
    assert f"to {out}" in capsys.readouterr().out
    test = drift[1][:4]
    expected = sp.load(model_file, device="cpu", progress=False).decide(test)
    scores, maps, _, anomalous, _ = session(out).run(None, {"images": test.numpy()})
    assert_relative(maps, expected.maps, 1e-3)
    assert_relative(scores, expected.scores, 1e-3)
    assert np.array_equal(anomalous, expected.anomalous.numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.onnx"]  # no temporary left


def test_cli_export_overwrites_only_its_own_files(model_file, tmp_path, capsys):
    out = tmp_path / "part.onnx"
    assert main(["export", "--model", str(model_file), "--out", str(out)]) == 0
    assert main(["export", "--model", str(model_file), "--out", str(out), "--factor", "dense"]) == 0
    foreign = tmp_path / "notes.onnx"
    foreign.write_text("not ours")
    capsys.readouterr()
    assert main(["export", "--model", str(model_file), "--out", str(foreign)]) == 2
    assert "--force" in capsys.readouterr().err and foreign.read_text() == "not ours"
    assert main(["export", "--model", str(model_file), "--out", str(model_file), "--force"]) == 2
    assert "is an input" in capsys.readouterr().err


def test_cli_export_unwritable_path(model_file, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["export", "--model", str(model_file), "--out", str(blocker / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stnpadim: error: ") and str(blocker / "m.onnx") in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_cli_export_missing_model(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "none.padim"), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stnpadim: error: ") and "none.padim" in err and "\n" not in err


def test_readme_onnx_snippet_scores_files_like_stnpadim_score(drift, tmp_path, capsys):
    """Issue 21: the README's ONNX Runtime code path (the package's load_image, then the
    graph) on image files gives `stnpadim score`'s scores, for files of the model's size and
    for larger ones (shrunk while decoding)."""
    import csv

    from PIL import Image

    from stnpadim_ext.data import load_image

    train, test, _ = drift
    model = fitted("efficientnet_lite0", True, train)
    model_path, onnx_path = tmp_path / "m.padim", tmp_path / "m.onnx"
    model.save(model_path)
    model.export_onnx(onnx_path)
    files = []
    for i, image in enumerate(test[:4]):
        rgb = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        files.append(tmp_path / "images" / f"{i}.png")
        files[-1].parent.mkdir(exist_ok=True)
        (rgb if i < 2 else rgb.resize((3 * SIZE, 3 * SIZE), Image.LANCZOS)).save(files[-1])
    assert main(["score", "--model", str(model_path), *map(str, files), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    with open(tmp_path / "out" / "scores.csv", newline="") as f:
        expected = {Path(row["image"]).name: float(row["score"]) for row in csv.DictReader(f)}
    sess = session(onnx_path)
    for path in files:
        image = load_image(path, SIZE)[None].numpy()  # the README snippet
        scores, _ = sess.run(["scores", "maps"], {"images": image})
        assert scores[0] == pytest.approx(expected[path.name], rel=1e-4), path.name
