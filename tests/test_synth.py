"""The synthetic MVTec-format generator: layout, determinism, exact masks, poses."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stnpadim_ext.data import synth
from stnpadim_ext.data.synth import CATEGORIES, DEFECTS, make_dataset
from stnpadim_ext.errors import InputError

SIZE = 64
COUNTS = dict(n_train=5, n_test_good=3, n_test_defect=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    names = make_dataset(root, seed=3, image_size=SIZE, progress=False, **COUNTS)
    return root, names


def _meta(root, name):
    return json.loads((root / name / "meta.json").read_text())


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _part_mask(angle, shift, size=SIZE, scale=1.0, perspective=(0.0, 0.0), shape="bracket"):
    """Where the part is at this pose, from its signed distance function."""
    part = synth._Part(np.random.default_rng(0), size, shape=shape)
    return part.sdf(*synth._Grid(size, angle, shift, scale, perspective).xy()) < 0


HARDER = ("part_wide", "part_scale", "part_lit", "part_sym", "part_clutter")


def test_layout_names_and_modes(dataset):
    root, names = dataset
    assert names == list(CATEGORIES)
    assert {"fabric", "grain", "part_aligned", "part_drift", "part_random"} <= set(names)
    for name in names:
        cat = root / name
        train = sorted(p.name for p in (cat / "train" / "good").iterdir())
        assert train == [f"{i:03d}.png" for i in range(COUNTS["n_train"])]
        assert sorted(p.name for p in (cat / "test").iterdir()) == sorted(("good",) + DEFECTS)
        assert len(list((cat / "test" / "good").iterdir())) == COUNTS["n_test_good"]
        assert not (cat / "ground_truth" / "good").exists()
        for defect in DEFECTS:
            images = sorted(p.name for p in (cat / "test" / defect).iterdir())
            masks = sorted(p.name for p in (cat / "ground_truth" / defect).iterdir())
            assert images == [f"{i:03d}.png" for i in range(COUNTS["n_test_defect"])]
            assert masks == [f"{i:03d}_mask.png" for i in range(COUNTS["n_test_defect"])]
            for image_name in images:
                with Image.open(cat / "test" / defect / image_name) as img:
                    assert (img.mode, img.size) == ("RGB", (SIZE, SIZE))
                with Image.open(cat / "ground_truth" / defect / image_name.replace(".png", "_mask.png")) as m:
                    assert (m.mode, m.size) == ("L", (SIZE, SIZE))
                    values = np.asarray(m)
                assert set(np.unique(values)) == {0, 255}
        meta = _meta(root, name)
        assert meta["spec"] == CATEGORIES[name]
        assert len(meta["images"]) == sum(1 for _ in (cat / "test").rglob("*.png")) + COUNTS["n_train"]


def test_same_seed_same_bytes_independent_of_other_categories(dataset, tmp_path):
    root, _ = dataset
    names = ["part_drift", "grain", "part_scale", "part_clutter"]
    make_dataset(tmp_path / "a", categories=names, seed=3, image_size=SIZE, progress=False, **COUNTS)
    for name in names:
        assert _files(tmp_path / "a" / name) == _files(root / name)


def test_other_seed_other_images(dataset, tmp_path):
    root, _ = dataset
    make_dataset(tmp_path, categories=["fabric"], seed=4, image_size=SIZE, progress=False, **COUNTS)
    a = _files(root / "fabric")
    b = _files(tmp_path / "fabric")
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a if k.endswith(".png")) == len([k for k in a if k.endswith(".png")])


def test_mask_matches_defect_pixels_exactly():
    """The defect changes exactly the pixels of its mask (after 8-bit quantisation, all
    changes inside the mask, nearly all mask pixels changed)."""
    for name in ("fabric", "grain", "mesh", "part_random") + HARDER:
        family = synth._family(name, seed=11, size=96)
        for i, kind in enumerate(DEFECTS * 2):
            rng = np.random.default_rng([i, len(name)])
            scale, perspective = (1.12, (0.06, -0.05)) if name == "part_scale" else (1.0, (0.0, 0.0))
            sample = family.render(rng, float(rng.uniform(-180, 180)), (1.0, -2.0), scale, perspective)
            image, mask = synth._add_defect(kind, sample, family, rng)
            changed = (synth._to_uint8(image) != synth._to_uint8(sample.image)).any(-1)
            assert mask.sum() >= 12, (name, kind)
            assert not (changed & ~mask).any(), (name, kind)
            assert changed[mask].mean() > 0.85, (name, kind, changed[mask].mean())
            if family.kind == "object":  # on the part, off its anti-aliased rim
                assert (sample.sdf[mask] < -1.0).all(), (name, kind)


def test_defect_sizes_visible_but_small(dataset):
    root, names = dataset
    for name in names:
        for entry in _meta(root, name)["images"].values():
            if entry["defect"]:
                fraction = entry["defect_pixels"] / SIZE ** 2
                assert 0.002 < fraction < 0.05, (name, entry)


def test_object_defects_lie_on_the_part_at_its_recorded_pose(dataset):
    root, _ = dataset
    for name in ("part_aligned", "part_drift", "part_random") + HARDER:
        shape = CATEGORIES[name].get("shape", "bracket")
        for rel, entry in _meta(root, name)["images"].items():
            if entry["mask"]:
                mask = np.asarray(Image.open(root / name / entry["mask"])) > 0
                on_part = _part_mask(entry["angle"], entry["shift"], SIZE, entry["scale"],
                                     entry["perspective"], shape)
                assert (mask <= on_part).all(), (name, rel)


def test_pose_ranges(dataset):
    root, _ = dataset
    limit = synth.SHIFT_FRACTION * SIZE
    poses = {name: _meta(root, name)["images"] for name in ("part_aligned", "part_drift", "part_random")}
    for rel, e in list(poses["part_aligned"].items()) + [
            (r, e) for r, e in poses["part_drift"].items() if r.startswith("train")]:
        assert abs(e["angle"]) <= 1.0 and max(map(abs, e["shift"])) <= 1.0, rel
    drift_test = [e for r, e in poses["part_drift"].items() if r.startswith("test")]
    assert all(abs(e["angle"]) <= 30.0 and max(map(abs, e["shift"])) <= limit for e in drift_test)
    assert max(abs(e["angle"]) for e in drift_test) > 10.0  # really drifts, good and defective
    assert any(e["defect"] is None and abs(e["angle"]) > 3.0 for e in drift_test)
    random = list(poses["part_random"].values())
    assert all(-180.0 <= e["angle"] < 180.0 and max(map(abs, e["shift"])) <= limit for e in random)
    angles = [e["angle"] for e in random]
    assert max(angles) - min(angles) > 180.0
    assert any(abs(e["angle"]) > 30.0 for r, e in poses["part_random"].items() if r.startswith("train"))


def test_harder_pose_modes(dataset):
    root, _ = dataset
    for name in HARDER:  # training images stay aligned (part_sym: random, like part_random)
        train = [e for r, e in _meta(root, name)["images"].items() if r.startswith("train")]
        if CATEGORIES[name]["pose"] != "random":
            assert all(abs(e["angle"]) <= 1.0 and e["scale"] == 1.0 for e in train), name
    wide = [e for r, e in _meta(root, "part_wide")["images"].items() if r.startswith("test")]
    assert all(abs(e["angle"]) <= synth.DRIFT_WIDE_DEG for e in wide)
    assert any(abs(e["angle"]) > 40.0 for e in wide)  # beyond the reconstruct STN's +-40 deg
    scaled = [e for r, e in _meta(root, "part_scale")["images"].items() if r.startswith("test")]
    assert all(abs(e["scale"] - 1) <= synth.SCALE_CHANGE for e in scaled)
    assert max(abs(e["scale"] - 1) for e in scaled) > 0.05
    assert all(max(map(abs, e["perspective"])) <= synth.PERSPECTIVE for e in scaled)
    assert any(max(map(abs, e["perspective"])) > 0.02 for e in scaled)
    for e in scaled:  # theta holds the scale: its linear part is scale * rotation
        linear = np.array(e["theta"])[:, :2]
        assert np.allclose(np.linalg.det(linear), e["scale"] ** 2, atol=1e-5)


def test_link_part_two_fold_symmetric_not_mirror_symmetric():
    size = 96
    base = _part_mask(0.0, (0.0, 0.0), size, shape="link")
    turned = _part_mask(180.0, (0.0, 0.0), size, shape="link")
    assert (base & turned).sum() / (base | turned).sum() > 0.99
    for mirror in (base[:, ::-1], base[::-1]):
        assert (base & mirror).sum() / (base | mirror).sum() < 0.8
    family = synth._family("part_sym", seed=5, size=size)
    a = family.render(np.random.default_rng(1), 0.0, (0.0, 0.0)).image
    b = family.render(np.random.default_rng(1), 180.0, (0.0, 0.0)).image
    assert np.abs(a - b).mean() < 0.005  # surface included: a half turn is not a defect


def test_scene_lighting_stays_put_and_clutter_stays_off_the_part():
    size = 96
    lit = synth._family("part_lit", seed=5, size=size)
    for angle in (0.0, 90.0, 180.0):  # the lamp does not turn with the part
        image = lit.render(np.random.default_rng(1), angle, (0.0, 0.0)).image
        assert image[:, :8].mean() > 1.3 * image[:, -8:].mean(), angle
    cluttered = synth._family("part_clutter", seed=5, size=size)
    a = cluttered.render(np.random.default_rng(1), 10.0, (0.0, 0.0))
    b = cluttered.render(np.random.default_rng(2), 10.0, (0.0, 0.0))
    diff = np.abs(a.image - b.image).max(-1)
    assert (diff[a.sdf > 2] > 0.1).mean() > 0.02        # clutter differs on the ground
    assert diff[a.sdf < -2].max() < 0.15                 # the part itself: gain and noise only


def test_theta_warps_image_back_to_canonical_pose(dataset):
    """affine_grid/grid_sample with the recorded theta puts the part, as seen in the PNG,
    onto the canonical part."""
    root, _ = dataset
    canonical = torch.from_numpy(_part_mask(0.0, (0.0, 0.0)))
    meta = _meta(root, "part_random")["images"]
    for rel in ("train/good/000.png", "train/good/001.png", "test/good/000.png", "test/hole/001.png"):
        entry = meta[rel]
        rgb = np.asarray(Image.open(root / "part_random" / rel), dtype=np.float32) / 255
        seen = torch.from_numpy((rgb.mean(-1) > 0.4).astype(np.float32))[None, None]  # metal vs ground
        theta = torch.tensor([entry["theta"]], dtype=torch.float32)
        grid = F.affine_grid(theta, (1, 1, SIZE, SIZE), align_corners=False)
        back = F.grid_sample(seen, grid, align_corners=False)[0, 0] > 0.5
        iou = (back & canonical).sum() / (back | canonical).sum()
        assert iou > 0.85, (rel, float(iou))
        c, s = math.cos(math.radians(entry["angle"])), math.sin(math.radians(entry["angle"]))
        assert np.allclose(entry["theta"], [[c, s, 2 * entry["shift"][0] / SIZE],
                                            [-s, c, 2 * entry["shift"][1] / SIZE]], atol=1e-6)


def test_part_inside_frame_at_any_pose_and_asymmetric():
    size, shift = 96, synth.SHIFT_FRACTION * 96
    for angle in np.arange(-180, 180, 7.5):
        for dx, dy in ((shift, shift), (-shift, shift), (shift, -shift), (-shift, -shift)):
            mask = _part_mask(angle, (dx, dy), size)
            border = np.r_[mask[0], mask[-1], mask[:, 0], mask[:, -1]]
            assert not border.any(), (angle, dx, dy)
    base = _part_mask(0.0, (0.0, 0.0), size)
    others = [np.rot90(base, k) for k in (1, 2, 3)] + [base[:, ::-1], base[::-1]]
    for other in others:  # no rotation or mirror maps the part onto itself
        assert (base & other).sum() / (base | other).sum() < 0.8


def test_textures_differ_between_families(dataset):
    root, _ = dataset
    means = {}
    for name in ("fabric", "grain", "mesh"):
        means[name] = np.asarray(Image.open(root / name / "train/good/000.png"), np.float32).mean((0, 1))
        other = np.asarray(Image.open(root / name / "train/good/001.png"), np.float32)
        first = np.asarray(Image.open(root / name / "train/good/000.png"), np.float32)
        assert np.abs(first - other).mean() > 10  # different pieces, not copies
    assert np.abs(means["fabric"] - means["grain"]).max() > 30
    assert np.abs(means["mesh"] - means["grain"]).max() > 30


def test_pose_parameter_overrides(tmp_path):
    make_dataset(tmp_path, categories=["part_aligned", "fabric"], seed=0, image_size=SIZE,
                 n_train=6, n_test_good=0, n_test_defect=0, pose={"part_aligned": "random"},
                 progress=False)
    meta = _meta(tmp_path, "part_aligned")
    assert meta["spec"]["pose"] == "random"
    assert max(abs(e["angle"]) for e in meta["images"].values()) > 30
    assert _meta(tmp_path, "fabric")["spec"]["pose"] == "aligned"
    assert not (tmp_path / "part_aligned" / "ground_truth").exists()


def test_bad_arguments_and_overwrite_rules(tmp_path):
    small = dict(image_size=32, n_train=1, n_test_good=1, n_test_defect=1, progress=False)
    with pytest.raises(InputError, match="unknown synthetic categories"):
        make_dataset(tmp_path, categories=["bottle"], **small)
    with pytest.raises(InputError, match="unknown pose modes"):
        make_dataset(tmp_path, categories=["fabric"], pose="sideways", **small)
    with pytest.raises(InputError, match="image_size"):
        make_dataset(tmp_path, categories=["fabric"], **{**small, "image_size": 8})
    foreign = tmp_path / "fabric"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("user data")
    with pytest.raises(InputError, match="not a synthetic set"):
        make_dataset(tmp_path, categories=["fabric"], overwrite=True, **small)
    assert (foreign / "precious.txt").read_text() == "user data"
    make_dataset(tmp_path, categories=["grain"], **small)
    with pytest.raises(InputError, match="already exists"):
        make_dataset(tmp_path, categories=["grain"], **small)
    make_dataset(tmp_path, categories=["grain"], overwrite=True, **{**small, "n_train": 2})
    assert len(list((tmp_path / "grain" / "train" / "good").iterdir())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fabric", "grain"]  # no temp left


def test_edge_defects_lie_in_the_outer_band(dataset):
    """part_edge (issue 19): defects where an aligning STN turns the image out of view,
    beyond EDGE_RADIUS from the centre, on the ground as well as on the part."""
    root, _ = dataset
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    radius = np.hypot((xs + 0.5) * 2 / SIZE - 1, (ys + 0.5) * 2 / SIZE - 1)
    masks = [np.asarray(Image.open(root / "part_edge" / e["mask"])) > 0
             for e in _meta(root, "part_edge")["images"].values() if e["mask"]]
    assert len(masks) == len(DEFECTS) * COUNTS["n_test_defect"]
    for mask in masks:
        assert mask.any() and (radius[mask] > synth.EDGE_RADIUS).all()
    assert any(radius[mask].max() > 1.1 for mask in masks)  # some in the corners


def test_calibration_images_are_good_and_posed_like_the_test_images(tmp_path):
    make_dataset(tmp_path, categories=["part_drift"], seed=1, image_size=SIZE, progress=False,
                 n_calibration=6, **COUNTS)
    folder = tmp_path / "part_drift"
    names = sorted(p.name for p in (folder / "calibration" / "good").iterdir())
    assert names == [f"{i:03d}.png" for i in range(6)]
    images = _meta(tmp_path, "part_drift")["images"]
    calibration = [e for rel, e in images.items() if rel.startswith("calibration/")]
    assert len(calibration) == 6 and all(e["defect"] is None for e in calibration)
    assert max(abs(e["angle"]) for e in calibration) > 5 * synth.JITTER_DEG  # drift, not jitter
    # The other images do not depend on whether calibration images were asked for.
    make_dataset(tmp_path / "plain", categories=["part_drift"], seed=1, image_size=SIZE,
                 progress=False, **COUNTS)
    plain = _files(tmp_path / "plain" / "part_drift")
    full = _files(folder)
    assert {k: v for k, v in full.items() if k != "meta.json" and not k.startswith("calibration/")} == \
        {k: v for k, v in plain.items() if k != "meta.json"}
