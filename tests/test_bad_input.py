"""Hostile files and user slips (issue 12): each must end in one clear line, never a
traceback, a silent NaN, a garbage score or an overwritten input.

CLI cases run `main([...])` and check exit status 2 and the single `stnpadim: error:` line
naming the file or argument; API cases check the InputError (a ValueError) message. Data:
a tiny synthetic category (64 px), efficientnet_lite0 (offline weights, or pretrained=False
where the weights do not matter).
"""
from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import stnpadim_ext.cli.experiment as experiment
import stnpadim_ext.cli.score as score_cli
from stnpadim_ext import STN, GaussianStats, PaDiM, train_stn
from stnpadim_ext.cli import main
from stnpadim_ext.data import synth
from stnpadim_ext.data.images import MAX_PIXELS, load_image
from stnpadim_ext.errors import InputError
from stnpadim_ext.models.padim import MAX_IMAGE_SIZE, load, serialization
from stnpadim_ext.report import write_text

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
FIT = ["--stn", "none", "--image-size", str(SIZE)]


# ----------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(root), "--categories", "fabric", "--image-size", str(SIZE),
                 "--n-train", "4", "--n-test-good", "2", "--n-test-defect", "1"]) == 0
    return root


@pytest.fixture(scope="module")
def model_file(data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "fabric.padim"
    assert main(["fit", "--data", str(data), "--category", "fabric", *FIT, "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def stn_model_file(tmp_path_factory) -> Path:
    """A small PaDiM behind an (untrained) STN: the model-file checks need its STN part."""
    model = PaDiM(pretrained=False, image_size=SIZE, stn=STN(), progress=False)
    model.fit(torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
    return model.save(tmp_path_factory.mktemp("stn") / "stn.padim")


def run_cli(capsys, argv) -> str:
    """Runs the CLI expecting a user error: exit 2, one `stnpadim: error:` line last (after
    any one-line warnings, e.g. a weak STN kept as asked); returns it."""
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert lines and lines[-1].startswith("stnpadim: error: "), err
    assert all(line.startswith("stnpadim: warning: ") for line in lines[:-1]), err
    return lines[-1]


def assert_error_names(capsys, argv, name) -> str:
    line = run_cli(capsys, argv)
    assert str(name) in line, (name, line)
    return line


def write_png(path: Path, size=(SIZE, SIZE), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def bomb_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""
    write_png(path, (8, 8))
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def float_tiff(path: Path, bad: float) -> Path:
    """A mode-F (32-bit float) TIFF in [0, 1] with one `bad` pixel."""
    pixels = np.full((SIZE, SIZE), 0.5, np.float32)
    pixels[3, 5] = bad
    Image.fromarray(pixels, mode="F").save(path)
    return path


def copy_category(data: Path, tmp_path: Path) -> Path:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data, root)
    return root


def edit_model(src: Path, dst: Path, config=None, tensors=None) -> Path:
    """Copies a model file, applying config(cfg) and tensors(dict) edits in place."""
    payload = torch.load(src, weights_only=True)
    cfg = json.loads(payload["config"])
    if config is not None:
        config(cfg)
    if tensors is not None:
        tensors(payload["tensors"])
    payload["config"] = json.dumps(cfg)
    torch.save(payload, dst)
    return dst


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ----------------------------------------------------------------------------------------
# 1. Decompression bombs; 13. format allow-list


def test_bomb_png_api(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    with pytest.raises(InputError, match="bomb.png: image has too many pixels"):
        load_image(bomb)
    model = PaDiM(pretrained=False, image_size=SIZE, progress=False)
    with pytest.raises(InputError, match="bomb.png"):
        model.fit([bomb, write_png(tmp_path / "ok.png")])


def test_above_our_pixel_limit_below_pils(tmp_path):
    side = int(MAX_PIXELS ** 0.5) + 100  # between our limit and PIL's error threshold
    big = bomb_png(tmp_path / "big.png", side, side)
    with pytest.raises(InputError, match=f"big.png: image is {side}x{side}.*above the limit"):
        load_image(big)


def test_bomb_in_score_folder(model_file, tmp_path, capsys):
    folder = tmp_path / "in"
    write_png(folder / "a.png")
    bomb_png(folder / "b.png")
    assert_error_names(capsys, ["score", "--model", model_file, folder, "--out", tmp_path / "o"],
                       folder / "b.png")
    assert files(tmp_path / "o") == []


def test_bomb_in_training_folder(data, tmp_path, capsys):
    root = copy_category(data, tmp_path)
    bomb = bomb_png(root / "fabric" / "train" / "good" / "001.png")
    assert_error_names(capsys, ["fit", "--data", root, "--category", "fabric", *FIT,
                                "--out", tmp_path / "m.padim"], bomb)


def test_bomb_as_mask(data, tmp_path, capsys):
    root = copy_category(data, tmp_path)
    mask = next((root / "fabric" / "ground_truth").rglob("*_mask.png"))
    bomb_png(mask)
    assert_error_names(capsys, ["eval", "--data", root, "--category", "fabric", *FIT], mask)


def test_eps_content_never_reaches_the_eps_plugin(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    def forbidden(self):
        raise AssertionError("the EPS plugin was consulted")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", forbidden)
    fake = tmp_path / "x.png"
    fake.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n")
    with pytest.raises(InputError, match="x.png: not a readable image"):
        load_image(fake)


def test_formats_outside_the_allow_list_are_refused(tmp_path, capsys, model_file):
    gif = tmp_path / "in" / "anim.png"
    gif.parent.mkdir()
    Image.new("P", (SIZE, SIZE)).save(gif, format="GIF")
    with pytest.raises(InputError, match="anim.png: not a readable image .*PNG, JPEG"):
        load_image(gif)
    assert_error_names(capsys, ["score", "--model", model_file, gif, "--out", tmp_path / "o"], gif)


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp"),
                                         ("TIFF", ".tif"), ("WEBP", ".webp")])
def test_allowed_formats_still_load(tmp_path, fmt, suffix):
    path = tmp_path / f"x{suffix}"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(path, format=fmt)
    assert load_image(path).shape == (3, 30, 40)


# ----------------------------------------------------------------------------------------
# 2. Non-UTF-8 file names; outputs of a run appear together


def test_non_utf8_file_name_round_trips(model_file, tmp_path, capsys):
    folder = tmp_path / "in"
    odd = write_png(folder / os.fsdecode(b"x\xffy.png"))
    out = tmp_path / "out"
    assert main(["score", "--model", str(model_file), str(folder), "--out", str(out)]) == 0
    capsys.readouterr()
    with open(out / "scores.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [str(odd)]
    assert (out / rows[0]["heatmap"]).is_file()


def test_score_outputs_appear_together_or_not_at_all(model_file, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "in"
    write_png(folder / "a.png")
    write_png(folder / "b.png", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.csv").write_text("image,score,heatmap\nold,1,old_heatmap.png\n")

    def fail(path, rows):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(score_cli, "write_scores_csv", fail)
    assert main(["score", "--model", str(model_file), str(folder), "--out", str(out)]) == 2
    capsys.readouterr()
    assert files(out) == ["scores.csv"]  # no heatmaps beside the old CSV, no staging folder
    assert "old_heatmap" in (out / "scores.csv").read_text()


# ----------------------------------------------------------------------------------------
# 3, 4, 14. Config values and tensors inside a model file


def _set(*keys, value):
    def edit(cfg):
        target = cfg
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit


CONFIG_EDITS = {
    "grid_text": _set("grid", value="ab"),
    "grid_wrong": _set("grid", value=[4, 4]),
    "sigma_negative": _set("sigma", value=-1.0),
    "sigma_nan": _set("sigma", value=float("nan")),
    "sigma_huge": _set("sigma", value=1e7),
    "sigma_zero": _set("sigma", value=0.0),
    "image_size_huge": _set("image_size", value=[30000, 30000]),
    "image_size_text": _set("image_size", value="ab"),
    "eps_text": _set("eps", value="0.1"),
    "seed_float": _set("seed", value=1.5),
    "n_features_huge": _set("n_features", value=10 ** 9),
    "backbone_list": _set("backbone", value=["resnet18"]),
    "unknown_key": _set("surprise", value=1),
    "stn_loc_size_huge": _set("stn", "loc_size", value=16000),
    "stn_width_text": _set("stn", "width", value="16"),
    "stn_translation_inf": _set("stn", "max_translation", value=float("inf")),
    "stn_not_dict": _set("stn", value=[1, 2]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_EDITS))
def test_model_file_config_is_validated(stn_model_file, tmp_path, capsys, case):
    bad = edit_model(stn_model_file, tmp_path / f"{case}.padim", config=CONFIG_EDITS[case])
    image = write_png(tmp_path / "a.png")
    line = assert_error_names(capsys, ["score", "--model", bad, image, "--out", tmp_path / "o"], bad)
    assert "damaged stnpadim model file" in line
    with pytest.raises(InputError, match=f"{case}.padim: damaged"):
        load(bad)


def _tensor_edit(name, fn):
    def edit(tensors):
        tensors[name] = fn(tensors[name])
    return edit


def _nan_at_0(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


TENSOR_EDITS = {
    "idx_out_of_range": _tensor_edit("embedding.idx", lambda t: t + 1000),
    "idx_negative": _tensor_edit("embedding.idx", lambda t: t - 1000),
    "idx_unsorted": _tensor_edit("embedding.idx", lambda t: t.flip(0)),
    "idx_float": _tensor_edit("embedding.idx", lambda t: t.float()),
    "mean_nan": _tensor_edit("gaussian.mean", _nan_at_0),
    "mean_inf": _tensor_edit("gaussian.mean", lambda t: t + float("inf")),
    "mean_float64": _tensor_edit("gaussian.mean", lambda t: t.double()),
    "mean_short": _tensor_edit("gaussian.mean", lambda t: t[:-1]),
    "factor_zero": _tensor_edit("gaussian.factor_packed", torch.zeros_like),
    "backbone_nan": _tensor_edit("embedding.backbone.stem.0.weight", _nan_at_0),
    "stn_nan": _tensor_edit("stn.head.bias", _nan_at_0),
    "stn_missing": lambda tensors: tensors.pop("stn.head.bias"),
    "extra_tensor": lambda tensors: tensors.update({"embedding.extra": torch.zeros(1)}),
}


@pytest.mark.parametrize("case", sorted(TENSOR_EDITS))
def test_model_file_tensors_are_validated(stn_model_file, tmp_path, capsys, case):
    bad = edit_model(stn_model_file, tmp_path / f"{case}.padim", tensors=TENSOR_EDITS[case])
    image = write_png(tmp_path / "a.png")
    assert_error_names(capsys, ["score", "--model", bad, image, "--out", tmp_path / "o"], bad)
    assert files(tmp_path / "o") == []


def test_valid_stn_model_file_still_loads(stn_model_file):
    model = load(stn_model_file)
    scores, maps = model.predict(torch.rand(2, 3, SIZE, SIZE))
    assert torch.isfinite(scores).all() and maps.shape == (2, SIZE, SIZE)


# ----------------------------------------------------------------------------------------
# 5. --image-size bound


@pytest.mark.parametrize("value", ["99999999999999999999", "100000", str(MAX_IMAGE_SIZE + 1)])
def test_image_size_upper_bound(data, tmp_path, capsys, value):
    line = assert_error_names(capsys, ["fit", "--data", data, "--category", "fabric", "--stn",
                                       "none", "--image-size", value, "--out", tmp_path / "m"],
                              "--image-size")
    assert f"<= {MAX_IMAGE_SIZE}" in line
    with pytest.raises(InputError, match="image_size"):
        PaDiM(pretrained=False, image_size=int(value))


# ----------------------------------------------------------------------------------------
# 6. NaN / Inf pixels and values outside [0, 1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_float_tiff_with_non_finite_pixel(model_file, tmp_path, capsys, bad):
    tiff = float_tiff(tmp_path / "f.tif", bad)
    with pytest.raises(InputError, match="f.tif: .*NaN or Inf"):
        load_image(tiff)
    assert_error_names(capsys, ["score", "--model", model_file, tiff, "--out", tmp_path / "o"], tiff)


def test_nan_tiff_in_training_folder_with_stn(data, tmp_path, capsys):
    root = copy_category(data, tmp_path)
    train = root / "fabric" / "train" / "good"
    float_tiff(train / "zz.tif", float("nan"))  # rejected when read: STN training or calibration
    assert_error_names(capsys, ["fit", "--data", root, "--category", "fabric", "--stn",
                                "reconstruct", "--stn-epochs", "1", "--accept-weak-stn",
                                "--image-size", SIZE, "--out", tmp_path / "m"], train / "zz.tif")


@pytest.mark.parametrize("case", ["nan", "inf", "255", "normalised"])
def test_api_tensors_must_be_finite_and_in_unit_range(case):
    x = torch.rand(2, 3, SIZE, SIZE)
    if case == "nan":
        x[0, 0, 0, 0] = float("nan")
    elif case == "inf":
        x[1, 2, 3, 4] = float("inf")
    elif case == "255":
        x = x * 255
    else:
        x = (x - 0.45) / 0.225
    model = PaDiM(pretrained=False, image_size=SIZE, progress=False)
    with pytest.raises(InputError, match="images"):
        model.fit(x)
    model.fit(torch.rand(3, 3, SIZE, SIZE))
    with pytest.raises(InputError, match="images"):
        model.predict(x)
    with pytest.raises(InputError, match="images"):
        train_stn(STN(), x, epochs=1, samples_per_epoch=2, progress=False)


# ----------------------------------------------------------------------------------------
# 7. Backbone weights load strictly


def test_resnet34_weights_refused_for_resnet18(data, tmp_path, capsys):
    from torchvision.models import resnet34

    weights = tmp_path / "r34.pth"
    torch.save(resnet34(weights=None).state_dict(), weights)
    line = assert_error_names(capsys, ["fit", "--data", data, "--category", "fabric", *FIT,
                                       "--backbone", "resnet18", "--weights", weights,
                                       "--out", tmp_path / "m.padim"], weights)
    assert "does not hold resnet18 weights" in line
    assert not (tmp_path / "m.padim").exists()


def test_weights_with_nan_refused(data, tmp_path, capsys):
    from torchvision.models import resnet18

    state = resnet18(weights=None).state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    weights = tmp_path / "nan.pth"
    torch.save(state, weights)
    line = assert_error_names(capsys, ["fit", "--data", data, "--category", "fabric", *FIT,
                                       "--backbone", "resnet18", "--weights", weights,
                                       "--out", tmp_path / "m.padim"], weights)
    assert "NaN" in line


# ----------------------------------------------------------------------------------------
# 8. Outputs never overwrite inputs or foreign files (unless --force)


def test_fit_out_onto_a_training_image(data, tmp_path, capsys):
    root = copy_category(data, tmp_path)
    image = root / "fabric" / "train" / "good" / "000.png"
    before = image.read_bytes()
    for force in ([], ["--force"]):
        line = assert_error_names(capsys, ["fit", "--data", root, "--category", "fabric", *FIT,
                                           "--out", image, *force], image)
        assert "input of this command" in line
    assert image.read_bytes() == before


def test_eval_json_onto_the_model(data, model_file, tmp_path, capsys):
    model = tmp_path / "m.padim"
    model.write_bytes(model_file.read_bytes())
    assert_error_names(capsys, ["eval", "--data", data, "--category", "fabric", "--model", model,
                                "--json", model], model)
    assert model.read_bytes() == model_file.read_bytes()


def test_score_out_is_the_input_folder(model_file, tmp_path, capsys):
    folder = tmp_path / "in"
    write_png(folder / "a.png")
    victim = write_png(folder / "a_heatmap.png", seed=3)  # an input that a heatmap name hits
    before = victim.read_bytes()
    assert_error_names(capsys, ["score", "--model", model_file, folder, "--out", folder, "--force"],
                       victim)
    assert victim.read_bytes() == before and files(folder) == ["a.png", "a_heatmap.png"]


def test_foreign_file_needs_force(data, model_file, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    fit = ["fit", "--data", data, "--category", "fabric", *FIT, "--out", notes]
    line = assert_error_names(capsys, fit, notes)
    assert "--force" in line and notes.read_text() == "my notes"
    results = tmp_path / "r.json"
    results.write_text('{"mine": 1}')
    assert_error_names(capsys, ["eval", "--data", data, "--category", "fabric", "--model",
                                model_file, "--json", results], results)
    assert results.read_text() == '{"mine": 1}'
    assert main([str(a) for a in fit + ["--force"]]) == 0
    assert serialization.is_model_file(notes)


def test_our_own_outputs_are_replaced_without_force(data, model_file, tmp_path, capsys):
    out = tmp_path / "m.padim"
    fit = ["fit", "--data", str(data), "--category", "fabric", *FIT, "--out", str(out)]
    assert main(fit) == 0 and main(fit) == 0
    image = write_png(tmp_path / "in" / "a.png")
    score = ["score", "--model", str(out), str(image), "--out", str(tmp_path / "s")]
    assert main(score) == 0 and main(score) == 0
    capsys.readouterr()


# ----------------------------------------------------------------------------------------
# 9. Output paths are checked before any work


@pytest.fixture
def no_work(monkeypatch):
    """Any fitting or evaluation fails the test: the output check must come first."""
    def forbidden(*args, **kwargs):
        pytest.fail("work started before the output path was checked")
    monkeypatch.setattr(experiment, "fit_model", forbidden)
    monkeypatch.setattr(experiment, "run_category", forbidden)
    monkeypatch.setattr("stnpadim_ext.cli.fit.fit_model", forbidden)
    monkeypatch.setattr("stnpadim_ext.cli.evaluate.run_category", forbidden)
    monkeypatch.setattr("stnpadim_ext.cli.demo.make_dataset", forbidden)


def test_demo_out_is_a_file(tmp_path, capsys, no_work):
    out = tmp_path / "f"
    out.write_text("x")
    assert_error_names(capsys, ["demo", "--out", out], out)


def test_eval_json_in_unwritable_place(data, tmp_path, capsys, no_work):
    target = Path("/proc/stnpadim-no-such-dir/r.json")
    assert_error_names(capsys, ["eval", "--data", data, "--category", "fabric", *FIT,
                                "--json", target], target)


def test_fit_out_in_unwritable_place_names_the_users_path(data, capsys, no_work):
    target = Path("/proc/stnpadim-no-such-dir/m.padim")
    line = assert_error_names(capsys, ["fit", "--data", data, "--category", "fabric", *FIT,
                                       "--out", target], target)
    assert ".tmp" not in line


def test_fit_out_below_a_file(data, tmp_path, capsys, no_work):
    blocker = write_png(tmp_path / "ok.png")
    line = assert_error_names(capsys, ["fit", "--data", data, "--category", "fabric", *FIT,
                                       "--out", blocker / "m.padim"], blocker)
    assert "not a folder" in line


def test_score_out_is_a_file(model_file, tmp_path, capsys):
    out = tmp_path / "f"
    out.write_text("x")
    image = write_png(tmp_path / "a.png")
    assert_error_names(capsys, ["score", "--model", model_file, image, "--out", out], out)


# ----------------------------------------------------------------------------------------
# 10. Stale temporaries, SIGTERM; 11. file mode


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    out = tmp_path / "m.padim"
    stale = tmp_path / f".m.padim.{_dead_pid()}.k2j4h5.tmp"
    stale.write_bytes(b"x" * 4096)
    live = tmp_path / f".m.padim.{os.getpid()}.abcdef.tmp"  # a writer still at work
    live.write_bytes(b"y")
    model = PaDiM(pretrained=False, image_size=SIZE, progress=False).fit(torch.rand(3, 3, SIZE, SIZE))
    model.save(out)
    assert not stale.exists() and live.exists()
    stale.write_bytes(b"x")
    write_text(out, "text")  # every atomic write cleans up the same way
    assert not stale.exists()


def test_sigterm_during_save_cleans_up(data, tmp_path, capsys, monkeypatch):
    def save_then_sigterm(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a model")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        pytest.fail("SIGTERM was not handled")

    monkeypatch.setattr(serialization.torch, "save", save_then_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    code = main(["fit", "--data", str(data), "--category", "fabric", *FIT,
                 "--out", str(tmp_path / "m.padim")])
    _, err = capsys.readouterr()
    # (The fit warns first that its 2 held-out images cannot support the default rate.)
    lines = [line for line in err.splitlines() if not line.startswith("stnpadim: warning:")]
    assert code == 143 and lines == ["stnpadim: terminated"]
    assert files(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == handler  # restored


def test_model_file_mode_follows_the_umask(tmp_path):
    mask = os.umask(0o022)
    try:
        out = tmp_path / "m.padim"
        out.write_bytes(b"")
        os.chmod(out, 0o644)
        model = PaDiM(pretrained=False, image_size=SIZE, progress=False).fit(torch.rand(3, 3, SIZE, SIZE))
        model.save(out)
        assert out.stat().st_mode & 0o777 == 0o666 & ~mask
    finally:
        os.umask(mask)


# ----------------------------------------------------------------------------------------
# 12. Memory on large images: decoded at reduced size


def test_large_image_is_reduced_while_decoding(tmp_path, monkeypatch):
    ramp = np.linspace(0, 255, 1600, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1).astype(np.uint8)
    path = tmp_path / "big.png"
    Image.fromarray(pixels).save(path)
    full = torch.nn.functional.interpolate(load_image(path)[None], size=(32, 32), mode="bilinear",
                                           antialias=True)[0]
    seen = []
    original = Image.Image.reduce
    monkeypatch.setattr(Image.Image, "reduce", lambda self, f, *a: seen.append(f) or original(self, f, *a))
    small = load_image(path, 32)
    assert seen == [12] and small.shape == (3, 32, 32)  # 1600 // (4 * 32)
    assert (small - full).abs().max() < 0.02
    capped = load_image(path, max_side=100)
    assert capped.shape == (3, 100, 100)


def test_heatmap_of_a_large_image_is_capped(model_file, tmp_path, capsys):
    image = write_png(tmp_path / "in" / "wide.png", size=(3000, 60))
    out = tmp_path / "o"
    assert main(["score", "--model", str(model_file), str(image), "--out", str(out)]) == 0
    capsys.readouterr()
    with Image.open(out / "wide_heatmap.png") as img:
        assert img.size == (score_cli.HEATMAP_MAX_SIDE, 41)


# ----------------------------------------------------------------------------------------
# 14. Messages name their input


def test_fit_with_one_training_image_names_the_folder(data, tmp_path, capsys):
    root = copy_category(data, tmp_path)
    train = root / "fabric" / "train" / "good"
    for path in sorted(train.iterdir())[1:]:
        path.unlink()
    line = assert_error_names(capsys, ["fit", "--data", root, "--category", "fabric", *FIT,
                                       "--out", tmp_path / "m.padim"], train)
    assert "at least 2" in line
    with pytest.raises(InputError, match=f"{train}: PaDiM needs at least 2"):
        PaDiM(pretrained=False, image_size=SIZE, progress=False).fit(sorted(train.iterdir()))


def test_nan_features_name_the_input(tmp_path):
    folder = tmp_path / "good"
    for i in range(3):
        write_png(folder / f"{i}.png", seed=i)
    model = PaDiM(pretrained=False, image_size=SIZE, progress=False)
    with torch.no_grad():
        next(model.embedding.backbone.parameters()).fill_(float("nan"))
    with pytest.raises(InputError, match=f"{folder}: emb contains NaN"):
        model.fit(folder)


# ----------------------------------------------------------------------------------------
# 15. API type slips


@pytest.mark.parametrize("kwargs, name", [
    ({"image_size": 64.0}, "image_size"),
    ({"image_size": "64"}, "image_size"),
    ({"image_size": True}, "image_size"),
    ({"image_size": (64, 64, 3)}, "image_size"),
    ({"center_crop": 48.5}, "center_crop"),
    ({"batch_size": "8"}, "batch_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"seed": -1}, "seed"),
    ({"n_features": 10.5}, "n_features"),
    ({"eps": "0.1"}, "eps"),
    ({"sigma": 0}, "sigma"),
    ({"sigma": float("nan")}, "sigma"),
    ({"device": "tpu"}, "device"),
    ({"device": 3.5}, "device"),
    ({"device": "banana"}, "device"),
    ({"backbone": ["resnet18"]}, "backbone"),
])
def test_padim_argument_slips(kwargs, name):
    with pytest.raises(InputError, match=name):
        PaDiM(pretrained=False, progress=False, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_padim_cuda_without_gpu():
    with pytest.raises(InputError, match="device: cuda: CUDA is not available"):
        PaDiM(pretrained=False, device="cuda")


def test_numpy_integers_are_accepted(tmp_path):
    model = PaDiM(pretrained=False, image_size=np.int64(SIZE), n_features=np.int32(20),
                  batch_size=np.int64(2), seed=np.int64(3), progress=False)
    assert model.image_size == (SIZE, SIZE) and type(model.image_size[0]) is int
    model.fit(torch.rand(3, 3, SIZE, SIZE))
    assert load(model.save(tmp_path / "m.padim")).image_size == (SIZE, SIZE)


def test_finalize_eps_text():
    stats = GaussianStats(4, 3).update(torch.rand(5, 3, 4))
    with pytest.raises(InputError, match="eps"):
        stats.finalize(eps="0.1")


def test_stn_float64_input():
    with pytest.raises(ValueError, match="STN input must be torch.float32"):
        STN()(torch.rand(1, 3, 32, 32, dtype=torch.float64))


def test_train_stn_image_size_zero():
    with pytest.raises(ValueError, match="image_size"):
        train_stn(STN(), torch.rand(4, 3, 32, 32), image_size=0, progress=False)


# ----------------------------------------------------------------------------------------
# 16. Concurrent synth --force to one root


def test_synth_image_size_bound_and_out_file(tmp_path, capsys):
    assert_error_names(capsys, ["synth", "--out", tmp_path / "s", "--image-size",
                                "99999999999999999999"], "--image-size")
    blocker = tmp_path / "f"
    blocker.write_text("x")
    assert_error_names(capsys, ["synth", "--out", blocker, "--categories", "fabric"], blocker)
    assert blocker.read_text() == "x" and files(tmp_path) == ["f"]


def test_synth_replaces_a_folder_another_run_just_wrote(tmp_path, monkeypatch):
    """A competing run moves its folder in between our move-aside and our rename."""
    root = tmp_path / "root"
    synth.make_dataset(root, categories="fabric", image_size=32, n_train=1, n_test_good=0,
                       n_test_defect=0, progress=False)
    rename = Path.rename
    raced = []

    def competitor_first(self, target):
        if Path(target) == root / "fabric" and not raced:
            raced.append(True)
            (root / "fabric").mkdir()
            (root / "fabric" / "meta.json").write_text('{"generator": "stnpadim synth"}')
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", competitor_first)
    synth.make_dataset(root, categories="fabric", image_size=32, n_train=2, n_test_good=0,
                       n_test_defect=0, overwrite=True, progress=False)
    assert raced and len(list((root / "fabric" / "train" / "good").iterdir())) == 2
    assert sorted(p.name for p in root.iterdir()) == ["fabric"]


def test_concurrent_synth_force(tmp_path):
    root = tmp_path / "root"
    argv = [sys.executable, "-m", "stnpadim_ext", "synth", "--out", str(root), "--force",
            "--categories", "fabric", "part_aligned", "--image-size", "32", "--n-train", "3",
            "--n-test-good", "1", "--n-test-defect", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        for proc in procs:
            proc.stdout.close()
            proc.stderr.close()
        assert all(code == 0 for code, _ in results), results
    assert sorted(p.name for p in root.iterdir()) == ["fabric", "part_aligned"]
    assert len(list((root / "fabric" / "train" / "good").iterdir())) == 3
