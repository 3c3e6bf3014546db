"""PaDiM: detection quality, embedding, anomaly maps, STN warp-back, save/load, bad input."""
import math
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

import stnpadim_ext as sp
from stnpadim_ext.api import score
from stnpadim_ext.data.mvtec import load_category
from stnpadim_ext.errors import InputError
from stnpadim_ext.models.backbones import build_backbone
from stnpadim_ext.models.blur import gaussian_blur
from stnpadim_ext.models.padim import PaDiM, load, serialization
from stnpadim_ext.models.padim.anomaly_map import distance_to_map
from stnpadim_ext.models.padim.torch_model import PadimEmbedding, channel_subset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grain(tmp_path_factory):
    from stnpadim_ext.data.synth import make_dataset

    root = tmp_path_factory.mktemp("synth")
    make_dataset(root, categories=["grain"], seed=int(torch.randint(0, 1000, ()).item()),
                 image_size=96, n_train=30, n_test_good=8, n_test_defect=3, progress=False)
    return load_category(root, "grain")


@pytest.fixture(scope="module")
def small_model():
    """A model fitted on random images (64 px): enough for plumbing tests."""
    return PaDiM(image_size=64, progress=False).fit(torch.rand(12, 3, 64, 64))


def test_detects_texture_defects_efficientnet_lite0(grain):
    model = PaDiM("efficientnet_lite0", image_size=128, progress=False)
    model.fit(grain.train_paths)
    loader = torch.utils.data.DataLoader(grain.test_set(), batch_size=8)
    scores, maps = model.predict(loader)
    items = grain.test_items
    labels = np.array([item.label for item in items])
    masks = torch.cat([batch["mask"] for batch in loader])
    assert scores.shape == (len(items),) and maps.shape == (len(items), 96, 96)
    assert torch.equal(scores, maps.flatten(1).amax(1))
    assert roc_auc_score(labels, scores.numpy()) > 0.9
    assert roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy()) > 0.8


def test_embedding_equals_concat_then_select():
    net = build_backbone("efficientnet_lite0")
    emb = PadimEmbedding(net, n_features=60, seed=3)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ours = emb(x)
        normalised = (x - emb.mean) / emb.std
        maps = net(normalised)
        full = torch.cat([maps[0]] + [F.interpolate(m, size=maps[0].shape[-2:], mode="nearest")
                                      for m in maps[1:]], 1)
    assert ours.shape == (2, 60, 16, 16)
    torch.testing.assert_close(ours, full[:, emb.idx])


def test_channel_subset_is_seeded_sorted_and_checked():
    a, b = channel_subset(176, 100, seed=5), channel_subset(176, 100, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, channel_subset(176, 100, seed=6))
    assert torch.all(a[1:] > a[:-1]) and a.min() >= 0 and a.max() < 176
    with pytest.raises(InputError, match="n_features"):
        channel_subset(176, 177, seed=0)
    assert PaDiM(progress=False).n_features == 100


def test_blur_matches_scipy_gaussian_filter():
    maps = torch.rand(3, 70, 90, dtype=torch.float64)
    ours = gaussian_blur(maps, sigma=4.0)
    # torch's "reflect" pad is scipy's "mirror"; both truncate at int(4 sigma + 0.5)
    want = np.stack([ndimage.gaussian_filter(m, sigma=4.0, mode="mirror", truncate=4.0)
                     for m in maps.numpy()])
    np.testing.assert_allclose(ours.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grid,size", [((16, 16), (64, 64)), ((7, 9), (61, 45)), ((5, 6), (20, 30)),
                                       ((12, 10), (8, 33))])
def test_distance_to_map_is_upsample_then_blur(grid, size):
    # (5, 6) -> (20, 30) is narrower than the blur radius (replicate borders); (12, 10) ->
    # (8, 33) shrinks one axis.
    distance = torch.rand(3, grid[0] * grid[1], dtype=torch.float64)
    up = F.interpolate(distance.view(3, 1, *grid), size=size, mode="bilinear", align_corners=False)
    want = gaussian_blur(up[:, 0], sigma=4.0)
    torch.testing.assert_close(distance_to_map(distance, grid, size), want, rtol=1e-10, atol=1e-12)
    got32 = distance_to_map(distance.float(), grid, size)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, want.float(), rtol=1e-5, atol=1e-6)


def test_maps_come_back_in_input_resolution(small_model):
    x = torch.rand(3, 3, 100, 80)
    scores, maps = small_model.predict(x)
    assert maps.shape == (3, 100, 80) and scores.shape == (3,)
    assert maps.dtype == torch.float32 and torch.isfinite(maps).all() and (maps >= 0).all()
    same = small_model.predict(x[:1])[1]
    torch.testing.assert_close(same, maps[:1], rtol=1e-4, atol=1e-4)


def test_center_crop_map_is_the_crop_models_map(tmp_path):
    train, test = torch.rand(10, 3, 80, 80), torch.rand(2, 3, 80, 80)
    cropped = PaDiM(image_size=80, center_crop=64, progress=False).fit(train)
    direct = PaDiM(image_size=64, progress=False).fit(train[:, :, 8:72, 8:72])
    _, maps = cropped.predict(test)
    _, want = direct.predict(test[:, :, 8:72, 8:72])
    assert maps.shape == (2, 80, 80)
    torch.testing.assert_close(maps[:, 8:72, 8:72], want, rtol=1e-4, atol=1e-3)
    # Outside the crop: the nearest pixel the model saw (border padding), not 0.
    torch.testing.assert_close(maps[:, :8, 8:72], maps[:, 8:9, 8:72].expand(2, 8, 64))
    torch.testing.assert_close(maps[:, 72:, :8], maps[:, 71:72, 8:9].expand(2, 8, 8))
    assert torch.allclose(cropped.out_of_view_fraction(test), torch.tensor(1 - 64 ** 2 / 80 ** 2))


class FixedRotation(torch.nn.Module):
    """An 'STN' that always rotates by a known angle: the warp-back check needs no training."""

    def __init__(self, degrees: float, padding_mode: str = "zeros"):
        super().__init__()
        a = math.radians(degrees)
        self.theta = torch.tensor([[[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]])
        self.padding_mode = padding_mode

    def forward(self, x):
        theta = self.theta.to(x).expand(x.shape[0], 2, 3)
        return sp.affine_sample(x, theta, padding_mode=self.padding_mode), theta


def _rotate(x, degrees):
    return FixedRotation(degrees)(x)[0]


def _smooth_images(n, size=96):
    # Low-frequency images: rotating them does not change their statistics (iid pixel noise
    # would be smoothed by the resampling and look anomalous everywhere).
    return F.interpolate(torch.rand(n, 3, 6, 6) * 0.3 + 0.35, size=(size, size), mode="bicubic",
                         align_corners=False).clamp(0, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stn_maps_are_warped_back_to_the_input_frame(seed):
    torch.manual_seed(seed)
    plain = PaDiM(image_size=96, progress=False).fit(_smooth_images(16))
    x = _smooth_images(1)
    x[:, :, 20:34, 58:72] = 1.0                  # one off-centre blob: the map is asymmetric
    drifted = _rotate(x, 25.0)                   # the input drifted by +25 degrees
    stn = FixedRotation(-25.0)                   # the "STN" undoes it
    model = PaDiM(image_size=96, stn=stn, progress=False)
    model.gaussian, model.grid = plain.gaussian, plain.grid
    scores, back = model.predict(drifted)

    # The map is the aligned image's map, brought back by the inverse rotation.
    aligned_map = plain.predict(stn(drifted)[0])[1]
    expected = _rotate(aligned_map[:, None], 25.0)[:, 0]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 96), torch.linspace(-1, 1, 96), indexing="ij")
    interior = (xx**2 + yy**2) < 0.8**2
    torch.testing.assert_close(back[:, interior], expected[:, interior], rtol=1e-4, atol=1e-3)
    assert torch.equal(scores, back.flatten(1).amax(1))

    # And it lands where the defect is in the input frame, not where the aligned image has it
    # (peaks searched inside the disk: the drifted input has black padded corners).
    def peak(m):
        m = torch.where(interior, m, 0)
        return torch.nonzero(m == m.max())[0].float()

    blob = torch.nonzero(drifted[0, 0] > 0.9).float().mean(0)
    assert torch.dist(peak(back[0]), blob) < 5, (peak(back[0]), blob)
    # The aligned frame has the blob ~12 px away, and its map is hotter there than at the
    # input frame's blob position.
    aligned_blob = torch.nonzero(stn(drifted)[0][0, 0] > 0.9).float().mean(0)
    assert torch.dist(aligned_blob, blob) > 8
    def at(m, point):
        return m[int(point[0].round()), int(point[1].round())]

    assert at(aligned_map[0], aligned_blob) > at(aligned_map[0], blob)


def test_stn_model_save_load_round_trip(tmp_path):
    from stnpadim_ext.models.stn import STN

    stn = STN(loc_size=32, width=4)
    with torch.no_grad():
        stn.head.bias[2] = 0.1                      # a non-identity transform: x shift
    model = PaDiM(image_size=64, stn=stn, progress=False).fit(torch.rand(10, 3, 64, 64))
    x = torch.rand(3, 3, 64, 64)
    scores, maps = model.predict(x)
    model.save(tmp_path / "stn.padim")
    loaded = load(tmp_path / "stn.padim")
    assert loaded.stn is not None and loaded.stn.config == stn.config
    scores2, maps2 = loaded.predict(x)
    assert torch.equal(scores, scores2) and torch.equal(maps, maps2)
    with pytest.raises(InputError, match="FixedRotation"):
        PaDiM(image_size=64, stn=FixedRotation(10.0), progress=False).fit(x).save(tmp_path / "f")


def test_stn_record_is_saved_checked_and_loaded(tmp_path):
    from stnpadim_ext.models.stn import STN, train_stn

    stn = STN(width=4, seed=0)
    train_stn(stn, torch.rand(6, 3, 32, 32), epochs=1, samples_per_epoch=8, batch_size=4,
              image_size=32, retries=0, accept_weak=True, progress=False)
    model = PaDiM(image_size=64, stn=stn, progress=False).fit(torch.rand(6, 3, 64, 64))
    model.save(tmp_path / "m.padim")
    assert load(tmp_path / "m.padim").stn.record == stn.record
    config, tensors = serialization.read_model_file(tmp_path / "m.padim")
    for damage in ({"retries": -1}, {"ranges": {"rotation": 400.0, "translation": 0.1, "scale": 1.1}},
                   {"objective": "invariance"}, {"alignment": {"rotation_deg": "x"}}):
        bad = {**config, "stn_training": {**config["stn_training"], **damage}}
        serialization.write_model_file(tmp_path / "bad.padim", bad, tensors)
        with pytest.raises(InputError, match="stn_training"):
            load(tmp_path / "bad.padim")


def test_sample_posed_reads_the_aligned_view_once_from_the_original():
    """Issue 19: what warp(warp(x, view), forward) shows, read in one interpolation from x.
    On a linear ramp bilinear interpolation is exact, so the two agree to rounding, padded
    corners included; on a texture the double warp is blurrier."""
    from stnpadim_ext.models.stn import random_similarity, similarity_theta
    from stnpadim_ext.models.stn.poses import sample_posed

    gen = torch.Generator().manual_seed(int(torch.randint(0, 1000, ()).item()))
    # Views that stay inside x (zoomed in), so the posed ramp is exactly linear; any forward.
    view = similarity_theta((torch.rand(4, generator=gen) - 0.5), torch.zeros(4, 2),
                            torch.full((4,), math.log(0.6)), aspect=1.2)
    forward = random_similarity(4, 40.0, 0.3, 1.3, gen, aspect=1.2)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 48), indexing="ij")
    ramp = torch.stack([0.3 * xs + 0.6 * ys, xs, 1 - ys]).expand(4, 3, 40, 48).contiguous()
    for padding in ("border", "reflection", "zeros"):
        twice = sp.affine_sample(sp.affine_sample(ramp, view, padding_mode="border"), forward,
                                 padding_mode=padding)
        once = sample_posed(ramp, view, forward, padding)
        inside = sp.affine_sample(torch.ones(4, 1, 40, 48), forward) > 1 - 1e-6
        # zeros: the bilinear fade at the frame's edge is only approximated outside `inside`
        where = inside.expand_as(once) if padding == "zeros" else torch.ones_like(once, dtype=torch.bool)
        torch.testing.assert_close(once[where], twice[where], atol=2e-5, rtol=0, msg=padding)
    texture = torch.rand(4, 3, 40, 48)
    once = sample_posed(texture, view, forward)
    twice = sp.affine_sample(sp.affine_sample(texture, view, padding_mode="border"), forward,
                             padding_mode="border")
    assert once.std() > 1.1 * twice.std()


def test_fit_on_posed_views_and_known_poses():
    x = _smooth_images(6)
    ranges = {"rotation": 30.0, "translation": 0.1, "scale": 1.1}
    a = PaDiM(image_size=96, progress=False).fit(x, ranges, n_views=20, seed=3)
    b = PaDiM(image_size=96, progress=False).fit(x, ranges, n_views=20, seed=3)
    c = PaDiM(image_size=96, progress=False).fit(x, ranges, n_views=20, seed=4)
    plain = PaDiM(image_size=96, progress=False).fit(x)
    assert torch.equal(a.gaussian.mean, b.gaussian.mean)
    assert not torch.equal(a.gaussian.mean, c.gaussian.mean)
    assert not torch.equal(a.gaussian.mean, plain.gaussian.mean)
    # Known poses: each image aligned by its own theta equals the STN slot doing the same.
    theta = sp.models.stn.similarity_theta(torch.tensor([0.3]), torch.zeros(1, 2), torch.zeros(1))
    stn = FixedRotation(math.degrees(0.3), padding_mode="border")
    torch.testing.assert_close(stn(x[:1])[1], theta)
    with_stn = PaDiM(image_size=96, stn=stn, progress=False)
    with_stn.gaussian, with_stn.grid = plain.gaussian, plain.grid
    known = PaDiM(image_size=96, progress=False)
    known.gaussian, known.grid = plain.gaussian, plain.grid
    torch.testing.assert_close(known.predict_batch(x, pose=theta.expand(6, 2, 3)),
                               with_stn.predict_batch(x), atol=1e-4, rtol=1e-5)


def test_save_load_round_trip_gives_identical_scores(small_model, tmp_path):
    x = torch.rand(4, 3, 64, 64)
    scores, maps = small_model.predict(x)
    path = small_model.save(tmp_path / "model.padim")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.padim"]   # no temp file left
    loaded = load(path)
    scores2, maps2 = loaded.predict(x)
    assert torch.equal(scores, scores2) and torch.equal(maps, maps2)
    assert torch.equal(loaded.embedding.idx, small_model.embedding.idx)
    scores3, maps3 = score(str(path), x)
    assert torch.equal(scores, scores3) and torch.equal(maps, maps3)
    scores4, _ = score(small_model, x)
    assert torch.equal(scores, scores4)


def test_bfloat16_factor_scores_close_to_float32_and_saves_float32(small_model, tmp_path):
    x = torch.rand(5, 3, 64, 64)
    path = small_model.save(tmp_path / "model.padim")
    scores, maps = small_model.predict(x)
    model = load(path, factor_dtype="bfloat16")
    scores16, maps16 = model.predict(x)
    assert not torch.equal(maps, maps16)  # the rounded factor is what the distances read
    # bfloat16 keeps 8 bits: 2^-9 relative per factor element, averaging out over C.
    assert ((maps16 - maps).abs() / maps).max() < 2**-8
    assert model.gaussian.factor_packed.dtype == torch.float32
    model.save(tmp_path / "again.padim")
    assert torch.equal(load(tmp_path / "again.padim").predict(x)[1], maps)  # nothing was lost
    model.factor_dtype = "float32"
    assert torch.equal(model.predict(x)[1], maps)
    with pytest.raises(InputError, match="factor_dtype must be one of float32, bfloat16; got 'float16'"):
        PaDiM(image_size=64, factor_dtype="float16", progress=False)


def test_interrupted_save_keeps_the_old_file(small_model, tmp_path, monkeypatch):
    path = small_model.save(tmp_path / "model.padim")
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(serialization.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        small_model.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.padim"]


def test_corrupt_model_files_give_clear_errors(small_model, tmp_path):
    good = small_model.save(tmp_path / "good.padim")
    cases = {}
    cases["random.padim"] = os.urandom(3000)
    cases["truncated.padim"] = good.read_bytes()[: good.stat().st_size // 2]
    cases["empty.padim"] = b""
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.padim")
    payload = torch.load(good, weights_only=True)
    payload["version"] = 99
    torch.save(payload, tmp_path / "future.padim")
    payload["version"] = serialization.FORMAT_VERSION
    payload["tensors"].pop("gaussian.mean")
    torch.save(payload, tmp_path / "damaged.padim")
    expected = {"random.padim": "not a stnpadim model file", "truncated.padim": "not a stnpadim model file",
                "empty.padim": "not a stnpadim model file", "foreign.padim": "not a stnpadim model file",
                "future.padim": "version 99", "damaged.padim": "damaged", "missing.padim": "no such model file"}
    (tmp_path / "pickle.padim").write_bytes(pickle.dumps({"weights": [1, 2]}))
    expected["pickle.padim"] = "no format torch.save writes"
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.padim")  # a pickled module: never run
    expected["module.padim"] = "torch file holding Python objects"
    expected["truncated.padim"] = "damaged or truncated torch file"
    expected["empty.padim"] = "the file is empty"
    for name, message in expected.items():
        with pytest.raises(InputError, match=message) as info:
            load(tmp_path / name)
        text = str(info.value)
        assert str(tmp_path / name) in text and "\n" not in text
        # Our words, complete: never torch's advice to load with weights_only=False.
        assert "weights_only" not in text and (text.endswith(")") or text[-1].isalnum())


def test_bad_inputs(small_model, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="unknown backbone 'resnet1000'"):
        PaDiM("resnet1000")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(InputError, match="resnet18-f37072fd.pth"):
        PaDiM("resnet18", pretrained=True)
    with pytest.raises(InputError, match="not fitted"):
        PaDiM(image_size=64, progress=False).predict(torch.rand(1, 3, 64, 64))
    with pytest.raises(InputError, match="not fitted"):
        PaDiM(image_size=64, progress=False).save(tmp_path / "x")
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        small_model.predict(torch.rand(64, 64))
    with pytest.raises(InputError, match="channels"):
        small_model.predict(torch.rand(2, 4, 64, 64))
    with pytest.raises(InputError, match="float"):
        small_model.predict(torch.zeros(2, 3, 64, 64, dtype=torch.int64))
    with pytest.raises(InputError, match="image_size"):
        PaDiM(image_size=8)
    with pytest.raises(InputError, match="center_crop"):
        PaDiM(image_size=64, center_crop=96)
    with pytest.raises(InputError, match="backbone_dtype"):
        PaDiM(backbone_dtype="int8")
    with pytest.raises(InputError, match="PaDiM model or a model file"):
        score(42, torch.rand(1, 3, 64, 64))


def test_images_in_any_mode_are_scored(small_model, tmp_path):
    rng = np.random.default_rng()
    grey = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    scores, maps = small_model.predict(sorted(tmp_path.glob("*.png")))
    assert scores.shape == (3,) and maps.shape == (3, 64, 64) and torch.isfinite(scores).all()
    # The 16-bit copy of the grey image is the same picture.
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-3)


def test_fit_on_a_folder_of_mixed_sizes_resizes_as_it_loads(tmp_path):
    rng = np.random.default_rng()
    for i, size in enumerate([(64, 64), (80, 72), (50, 90), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    from_folder = PaDiM(image_size=64, progress=False).fit(tmp_path)
    tensors = torch.stack([sp.data.images.load_image(p, 64) for p in sorted(tmp_path.glob("*.png"))])
    from_tensors = PaDiM(image_size=64, progress=False).fit(tensors)
    torch.testing.assert_close(from_folder.gaussian.mean, from_tensors.gaussian.mean)
    with pytest.raises(InputError, match="different sizes"):
        from_folder.predict(tmp_path)  # maps come back at each image's own size


def test_bfloat16_backbone_tracks_float32():
    train, test = torch.rand(10, 3, 64, 64), torch.rand(6, 3, 64, 64)
    test[:3, :, 20:40, 20:40] = 1.0
    s32, _ = PaDiM(image_size=64, progress=False).fit(train).predict(test)
    s16, _ = PaDiM(image_size=64, backbone_dtype="bfloat16", progress=False).fit(train).predict(test)
    assert s16.dtype == torch.float32
    assert np.corrcoef(s32.numpy(), s16.numpy())[0, 1] > 0.9


REFERENCE_RUN = textwrap.dedent("""
    import sys, torch
    import stnpadim_ext as sp
    from stnpadim_ext.models.padim import PaDiM
    train, test = torch.load(sys.argv[1])
    info = sp.backend_info()
    model = PaDiM(image_size=64, center_crop=56, progress=False).fit(train)
    scores, maps = model.predict(test)
    torch.save({"scores": scores, "maps": maps, "extension": info["extension"]}, sys.argv[2])
""")


def test_reference_ops_and_extension_give_the_same_scores(tmp_path):
    train, test = torch.rand(10, 3, 64, 64), torch.rand(4, 3, 64, 64)
    torch.save((train, test), tmp_path / "data.pt")
    outputs = {}
    for name, no_ext in (("ext", "0"), ("ref", "1")):
        env = dict(os.environ, STNPADIM_NO_EXT=no_ext, PYTHONPATH=str(REPO))
        subprocess.run([sys.executable, "-c", REFERENCE_RUN, str(tmp_path / "data.pt"),
                        str(tmp_path / f"{name}.pt")], env=env, check=True, timeout=300)
        outputs[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    assert outputs["ref"]["extension"] is False
    assert outputs["ext"]["extension"] == sp.backend_info()["extension"]
    torch.testing.assert_close(outputs["ext"]["scores"], outputs["ref"]["scores"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(outputs["ext"]["maps"], outputs["ref"]["maps"], rtol=1e-4, atol=1e-3)


def test_map_operators_are_built_once_per_shape():
    from stnpadim_ext.models.padim import anomaly_map

    anomaly_map._map_operators.cache_clear()
    distance = torch.rand(2, 7 * 9)
    first = distance_to_map(distance, (7, 9), (61, 45))
    again = distance_to_map(distance, (7, 9), (61, 45))
    assert anomaly_map._map_operators.cache_info().hits == 1
    assert torch.equal(first, again)
    distance_to_map(distance.double(), (7, 9), (61, 45))  # another dtype: another entry
    assert anomaly_map._map_operators.cache_info().currsize == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fit_and_predict_match_cpu():
    train, test = torch.rand(12, 3, 64, 64), torch.rand(5, 3, 80, 72)
    test[:2, :, 20:40, 20:40] = 1.0
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        models = [PaDiM(backbone="resnet18", pretrained=False, image_size=64, device=device,
                        backbone_dtype="float32", progress=False) for device in ("cpu", "cuda")]
        cpu, gpu = models
        gpu.embedding.load_state_dict(cpu.embedding.state_dict())  # the same random weights
        cpu.fit(train)
        gpu.fit(train)
        assert gpu.gaussian.mean.is_cuda
        torch.testing.assert_close(gpu.gaussian.mean.cpu(), cpu.gaussian.mean, rtol=1e-4, atol=1e-4)
        s_cpu, m_cpu = cpu.predict(test)
        s_gpu, m_gpu = gpu.predict(test)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert s_gpu.device.type == "cpu" and m_gpu.shape == (5, 80, 72)
    torch.testing.assert_close(s_gpu, s_cpu, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(m_gpu, m_cpu, rtol=1e-3, atol=1e-3)


def test_uint8_images_score_as_float_ones(small_model):
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    s8, m8 = small_model.predict(x)
    s32, m32 = small_model.predict(x.float() / 255)
    torch.testing.assert_close(s8, s32, rtol=0, atol=0)
    torch.testing.assert_close(m8, m32, rtol=0, atol=0)


def test_predict_from_large_files_decodes_at_model_size(small_model, tmp_path):
    """Files four times the model's size decode straight to it; the maps still come back at
    the files' size and agree with predicting the fully decoded images."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:256, 0:256]
    for i in range(3):
        base = np.stack([ys, xs, ys + xs], 2) / (1 + i) + rng.normal(0, 8, (256, 256, 3))
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    scores, maps = small_model.predict(tmp_path)
    assert maps.shape == (3, 256, 256)
    full = torch.stack([sp.data.load_image(p) for p in sorted(tmp_path.glob("*.png"))])
    full_scores, full_maps = small_model.predict(full)
    torch.testing.assert_close(scores, full_scores, rtol=0.05, atol=0)
    assert np.corrcoef(maps.flatten().numpy(), full_maps.flatten().numpy())[0, 1] > 0.98
