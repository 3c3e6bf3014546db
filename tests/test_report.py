"""stnpadim_ext.report: atomic writers, heatmap overlays, results summary and the table."""
from __future__ import annotations

import colorsys
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from stnpadim_ext.errors import InputError
from stnpadim_ext.report import (
    aggregate_runs,
    atomic_file,
    colorize,
    markdown_table,
    mask_overlay,
    overlay,
    summarize,
    summarize_runs,
    write_image,
    write_json,
    write_scores_csv,
    write_text,
)


def test_atomic_file_keeps_old_content_when_writing_fails(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_atomic_file_creates_parents_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "table.md"
    write_text(target, "first")
    write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["table.md"]


def test_atomic_file_refuses_a_folder(tmp_path):
    with pytest.raises(InputError, match=str(tmp_path)):
        write_text(tmp_path, "x")


def test_write_json_turns_nan_into_null(tmp_path):
    path = write_json(tmp_path / "r.json", {"a": float("nan"), "b": [1.5, float("inf")]})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None]}


def test_write_scores_csv_round_trip(tmp_path):
    rows = [{"image": f"img{i}.png", "score": str(s)} for i, s in enumerate(np.random.rand(5))]
    path = write_scores_csv(tmp_path / "scores.csv", rows)
    with open(path, newline="") as f:
        assert list(csv.DictReader(f)) == rows
    with pytest.raises(InputError):
        write_scores_csv(tmp_path / "empty.csv", [])
    assert not (tmp_path / "empty.csv").exists()


def test_colorize_range_ends_and_clipping():
    low, high = np.random.rand() * 5, 10 + np.random.rand() * 5
    rgb = colorize(np.array([[low - 1, low, high, high + 1]]), low, high)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    np.testing.assert_array_equal(rgb[0, 0], rgb[0, 1])  # clipped below
    np.testing.assert_array_equal(rgb[0, 2], rgb[0, 3])  # clipped above
    np.testing.assert_allclose(rgb[0, 1], [0, 0, 128], atol=1)  # dark blue
    np.testing.assert_allclose(rgb[0, 2], [128, 0, 0], atol=1)  # dark red


def test_colorize_hue_goes_from_blue_to_red():
    # Between the dark ends (the outer eighths) jet's hue falls monotonically, 240 -> 0 deg.
    values = np.sort(np.random.uniform(0.125, 0.875, 50))
    rgb = colorize(values[None], 0.0, 1.0)[0] / 255.0
    hue = np.array([colorsys.rgb_to_hsv(*c)[0] for c in rgb])
    assert (np.diff(hue) <= 1e-2).all() and hue[0] > hue[-1]


def test_overlay_resizes_map_and_blends():
    image = torch.rand(3, 40, 60)
    amap = torch.rand(10, 15) * 7
    out = overlay(image, amap, 0.0, 7.0, alpha=0.0)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    expected = np.rint(image.permute(1, 2, 0).numpy() * 255)
    np.testing.assert_allclose(out, expected, atol=1)
    same_size = torch.rand(40, 60)
    np.testing.assert_array_equal(overlay(image, same_size, 0, 1, alpha=1.0),
                                  colorize(same_size.numpy(), 0, 1))


def test_mask_overlay_tints_only_the_mask():
    image = (np.random.rand(20, 30, 3) * 255).astype(np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:9, 10:20] = True
    out = mask_overlay(image, mask)
    np.testing.assert_array_equal(out[~mask], image[~mask])
    assert (out[mask][:, 0].astype(int) >= image[mask][:, 0]).all()


def test_write_heatmap_png(tmp_path):
    path = write_image(tmp_path / "h.png", overlay(torch.rand(3, 32, 48), torch.rand(8, 12), 0, 1))
    with Image.open(path) as img:
        assert img.size == (48, 32) and img.mode == "RGB"
    mask = write_image(tmp_path / "m.png", (np.random.rand(32, 48) > 0.5).astype(np.uint8) * 255)
    with Image.open(mask) as img:
        assert img.size == (48, 32) and img.mode == "L"


def _metrics(rng):
    return {"image_auroc": float(rng.random()), "pixel_auroc": float(rng.random()),
            "aupro": float(rng.random())}


def test_summarize_means_skip_missing_values():
    rng = np.random.default_rng()
    categories = {"a": _metrics(rng), "b": _metrics(rng), "c": {**_metrics(rng), "aupro": None}}
    result = summarize(categories)
    assert result["categories"] == categories
    assert result["mean"]["image_auroc"] == pytest.approx(np.mean([m["image_auroc"] for m in categories.values()]))
    assert result["mean"]["aupro"] == pytest.approx(np.mean([categories[c]["aupro"] for c in "ab"]))


def test_aggregate_runs_mean_sd_interval():
    runs = [{"image_auroc": 0.9, "aupro": None, "fit_seconds": 2.0},
            {"image_auroc": 0.8, "aupro": None, "fit_seconds": 4.0},
            {"image_auroc": 1.0, "aupro": None, "fit_seconds": 3.0}]
    out = aggregate_runs(runs)
    assert out["n_runs"] == 3 and out["aupro"] is None and "aupro_sd" not in out
    assert out["image_auroc"] == pytest.approx(0.9) and out["image_auroc_sd"] == pytest.approx(0.1)
    assert out["image_auroc_runs"] == [0.9, 0.8, 1.0]
    # t-interval over 3 runs: 0.9 +- t(0.975, 2) * 0.1 / sqrt(3)
    low, high = out["image_auroc_ci95"]
    assert (low, high) == pytest.approx((0.9 - 4.302653 * 0.1 / 3 ** 0.5, 0.9 + 4.302653 * 0.1 / 3 ** 0.5))
    one = aggregate_runs(runs[:1])
    assert one["image_auroc_sd"] == 0.0 and one["image_auroc_ci95"] is None


def test_summarize_runs_mean_row_is_the_spread_of_per_seed_means():
    categories = {"a": [{"image_auroc": 0.5}, {"image_auroc": 0.7}],
                  "b": [{"image_auroc": 0.9}, {"image_auroc": 0.7}]}
    result = summarize_runs(categories)
    assert result["categories"]["a"]["image_auroc"] == pytest.approx(0.6)
    # per-seed means 0.7 and 0.7: no spread, although each category has one
    assert result["mean"]["image_auroc"] == pytest.approx(0.7)
    assert result["mean"]["image_auroc_sd"] == pytest.approx(0.0)
    table = markdown_table({"PaDiM": result}, metrics=("image_auroc",))
    assert "| a | 0.600 ± 0.141 |" in table
    with pytest.raises(ValueError, match="same number of runs"):
        summarize_runs({"a": [{}], "b": [{}, {}]})


def test_markdown_table_rows_columns_and_means():
    rng = np.random.default_rng()
    names = ["carpet", "screw", "wood"]
    arms = {label: summarize({n: _metrics(rng) for n in names}) for label in ("PaDiM", "STN+PaDiM")}
    arms["STN+PaDiM"]["categories"]["wood"]["aupro"] = None
    table = markdown_table(arms, groups={"textures": ["carpet", "wood"], "objects": ["screw"]})
    lines = table.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["category", "image AUROC PaDiM", "image AUROC STN+PaDiM", "pixel AUROC PaDiM",
                      "pixel AUROC STN+PaDiM", "AUPRO PaDiM", "AUPRO STN+PaDiM"]
    rows = {line.strip("|").split("|")[0].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in lines[2:]}
    assert list(rows) == names + ["mean (textures)", "mean (objects)", "**mean**"]
    screw = arms["STN+PaDiM"]["categories"]["screw"]
    assert rows["screw"][1] == f"{screw['image_auroc']:.3f}"
    assert rows["wood"][5] == "n/a"
    textures = np.mean([arms["PaDiM"]["categories"][n]["pixel_auroc"] for n in ("carpet", "wood")])
    assert rows["mean (textures)"][2] == f"{textures:.3f}"
    assert rows["**mean**"][0] == f"{arms['PaDiM']['mean']['image_auroc']:.3f}"
