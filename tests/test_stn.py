"""STN: theta conventions, inversion, network, losses, congealing, training, acceptance."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import stnpadim_ext as sp
from stnpadim_ext.errors import InputError, WeakSTNError
from stnpadim_ext.models.stn import (
    STN,
    centring_theta,
    compose,
    identity_theta,
    invert_theta,
    measure_alignment,
    random_similarity,
    similarity_theta,
    theta_pose,
    train_stn,
)
from stnpadim_ext.models.stn.losses import msssim_score, photometric_loss, pose_loss
from stnpadim_ext.models.stn.register import congeal
from stnpadim_ext.models.stn.transforms import affine_theta


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second intra-op thread only adds synchronisation, and on a shared
    2-core machine it makes these tests up to 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shapes(angles, shifts, size=48):
    """An asymmetric flag-like part (bar, arm, dot) posed by angles [N] (radians, about the
    centre) and shifts [N, 2] (normalised), drawn analytically: [N, 3, size, size]."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) * 2 / size - 1
    y, x = torch.meshgrid(c, c, indexing="ij")
    x, y = x - shifts[:, 0, None, None], y - shifts[:, 1, None, None]
    cos, sin = torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None]
    u, v = cos * x + sin * y, -sin * x + cos * y

    def box(cx, cy, hx, hy):
        return torch.sigmoid(20 * (hx - (u - cx).abs())) * torch.sigmoid(20 * (hy - (v - cy).abs()))

    part = (box(0.0, 0.0, 0.55, 0.12) + box(0.4, 0.3, 0.12, 0.3)).clamp(max=1)
    dot = torch.sigmoid(20 * (0.1 - ((u + 0.35) ** 2 + (v + 0.25) ** 2).sqrt()))
    image = 0.15 + 0.6 * part + 0.25 * dot
    return torch.stack([image, 0.9 * image, 0.8 * image], 1).clamp(0, 1)


def random_affine(n, gen):
    u = torch.rand(n, 6, generator=gen) * 2 - 1
    return affine_theta(u[:, 0] * math.pi, 0.3 * u[:, 1], 0.3 * u[:, 2], 0.3 * u[:, 3],
                        0.3 * u[:, 4:6])


# ---------------------------------------------------------------------------- transforms


def test_rotation_by_90_degrees_matches_rot90():
    x = torch.rand(2, 3, 16, 16)
    theta = similarity_theta(torch.full((2,), math.pi / 2), torch.zeros(2, 2), torch.zeros(2))
    out = sp.affine_sample(x, theta)
    # theta maps output to input: out(x, y) = in(-y, x), i.e. out[r, c] = in[c, W-1-r]
    assert torch.allclose(out, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)


def test_translation_moves_by_whole_pixels():
    x = torch.rand(1, 3, 12, 20)
    shift = torch.tensor([[2 * 3 / 20, 2 * -2 / 12]])  # 3 px right, 2 px up
    theta = similarity_theta(torch.zeros(1), shift, torch.zeros(1))
    out = sp.affine_sample(x, theta)
    assert torch.allclose(out[..., 2:, :-3], x[..., :-2, 3:], atol=1e-5)


def test_rotation_is_a_rotation_in_pixels_on_non_square_images():
    h, w = 30, 50
    angle, log_scale = torch.tensor([0.7]), torch.tensor([0.2])
    theta = similarity_theta(angle, torch.zeros(1, 2), log_scale, aspect=w / h)
    grid = F.affine_grid(theta, (1, 3, h, w), align_corners=False)[0]
    pixels = grid * torch.tensor([w / 2, h / 2])  # normalised -> pixel units
    step_x = pixels[0, 1] - pixels[0, 0]  # image of a one-pixel step right
    step_y = pixels[1, 0] - pixels[0, 0]  # and down
    s = math.exp(0.2)
    assert torch.allclose(step_x, s * torch.tensor([math.cos(0.7), math.sin(0.7)]), atol=1e-4)
    assert torch.allclose(step_y, s * torch.tensor([-math.sin(0.7), math.cos(0.7)]), atol=1e-4)
    pose = theta_pose(theta, aspect=w / h)
    assert pose["rotation_deg"].item() == pytest.approx(math.degrees(0.7), abs=1e-3)
    assert pose["log_scale"].item() == pytest.approx(0.2, abs=1e-5)


def test_compose_is_warping_twice():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ()).item()))
    a, b = random_affine(2, gen) * 0.3, random_affine(2, gen) * 0.3
    a[:, 0, 0] += 1
    a[:, 1, 1] += 1
    grid_b = F.affine_grid(b, (2, 3, 24, 24), align_corners=False)
    points = grid_b.reshape(2, -1, 2)  # b(p) for every output pixel p
    through_a = (points @ a[:, :, :2].transpose(1, 2) + a[:, None, :, 2])
    direct = F.affine_grid(compose(a, b), (2, 3, 24, 24), align_corners=False).reshape(2, -1, 2)
    assert torch.allclose(through_a, direct, atol=1e-5)


def test_invert_theta_round_trip():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ()).item()))
    theta = random_affine(16, gen)
    eye = identity_theta(16)
    assert torch.allclose(compose(theta, invert_theta(theta)), eye, atol=1e-5)
    assert torch.allclose(compose(invert_theta(theta), theta), eye, atol=1e-5)
    assert torch.allclose(invert_theta(invert_theta(theta)), theta, atol=1e-5)


def test_invert_theta_brings_a_warped_map_back():
    angles = (torch.rand(3) * 2 - 1) * 0.5
    theta = similarity_theta(angles, (torch.rand(3, 2) * 2 - 1) * 0.05, torch.zeros(3))
    c = torch.linspace(-3, 3, 64)
    phase = torch.rand(3, 1, 1, 1) * 6
    x = 0.5 + 0.25 * torch.sin(c[:, None] + phase) * torch.cos(0.7 * c[None, :] - phase)
    warped = sp.affine_sample(x, theta)
    centre = (slice(None), slice(None), slice(20, 44), slice(20, 44))  # inside both frames
    back = sp.affine_sample(warped, invert_theta(theta))
    assert (back - x)[centre].abs().max() < 0.01
    wrong = sp.affine_sample(warped, theta)  # warping twice the same way does not undo it
    assert (wrong - x)[centre].abs().max() > 0.05


def test_invert_theta_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\[B, 2, 3\]"):
        invert_theta(torch.eye(3)[None])


def test_random_similarity_is_proper_and_within_ranges():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ()).item()))
    theta = random_similarity(500, rotation=30.0, translation=0.1, scale=1.2, generator=gen)
    det = theta[:, 0, 0] * theta[:, 1, 1] - theta[:, 0, 1] * theta[:, 1, 0]
    assert (det > 0).all()
    pose = theta_pose(theta)
    assert pose["rotation_deg"].abs().max() <= 30.0 + 1e-4
    assert pose["rotation_deg"].abs().max() > 25.0  # the range is used, not just respected
    assert pose["translation"].abs().max() <= 0.1 + 1e-6
    assert pose["log_scale"].abs().max() <= math.log(1.2) + 1e-5
    with pytest.raises(ValueError, match="scale >= 1"):
        random_similarity(2, rotation=10.0, translation=0.1, scale=0.9)


# ---------------------------------------------------------------------------- network


@pytest.mark.parametrize("transform", ["similarity", "affine"])
def test_stn_starts_at_identity_on_any_size(transform):
    stn = STN(transform=transform)
    x = torch.rand(3, 3, 50, 70)
    aligned, theta = stn(x)
    assert aligned.shape == x.shape and theta.shape == (3, 2, 3)
    assert torch.allclose(theta, identity_theta(3), atol=1e-6)
    assert torch.allclose(aligned, x, atol=1e-5)


def test_stn_config_rebuilds_it():
    stn = STN(transform="affine", width=8, padding_mode="border")
    with torch.no_grad():
        for p in stn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    clone = STN(**json.loads(json.dumps(stn.config)))
    clone.load_state_dict(stn.state_dict())
    x = torch.rand(2, 3, 40, 40)
    assert torch.equal(clone(x)[1], stn(x)[1])


@pytest.mark.parametrize("transform", ["similarity", "affine"])
def test_predicted_transforms_never_mirror(transform):
    stn = STN(transform=transform)
    with torch.no_grad():
        stn.head.weight.normal_(0, 5.0)
        stn.head.bias.normal_(0, 5.0)
    theta = stn.predict_theta(torch.rand(64, 3, 32, 32))
    det = theta[:, 0, 0] * theta[:, 1, 1] - theta[:, 0, 1] * theta[:, 1, 0]
    assert (det > 0).all()
    pose = theta_pose(theta)
    assert pose["translation"].abs().max() <= stn.config["max_translation"] + 1e-5
    if transform == "similarity":
        assert pose["log_scale"].abs().max() <= stn.config["max_log_scale"] + 1e-5


def test_head_reaches_any_angle():
    stn = STN()
    angle = (torch.rand(()) * 2 - 1) * math.pi
    with torch.no_grad():
        stn.head.bias[:2] = 3.0 * torch.stack([torch.cos(angle), torch.sin(angle)])
    rotation = theta_pose(stn.predict_theta(torch.rand(1, 3, 32, 32)))["rotation_deg"]
    assert rotation.item() == pytest.approx(math.degrees(angle.item()), abs=1e-3)


def test_aligned_equals_affine_sample_with_theta():
    stn = STN(padding_mode="border")
    with torch.no_grad():
        stn.head.bias.copy_(torch.tensor([0.8, 0.4, 0.1, -0.05, 0.1]))
    x = torch.rand(2, 3, 32, 48)
    aligned, theta = stn(x)
    expected = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False),
                             padding_mode="border", align_corners=False)
    assert torch.allclose(aligned, expected, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"transform": "projective"}, "transform"),
    ({"padding_mode": "wrap"}, "padding_mode"),
    ({"loc_size": 8}, "loc_size"),
    ({"width": 6}, "width"),
    ({"max_translation": 0.0}, "max_translation"),
])
def test_stn_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        STN(**kwargs)


def test_stn_rejects_bad_input_shape():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        STN()(torch.rand(2, 1, 32, 32))


# ---------------------------------------------------------------------------- losses


@pytest.mark.parametrize("size", [20, 40, 64, 100, 170])
def test_msssim_is_one_for_identical_images_and_lower_otherwise(size):
    x = torch.rand(2, 3, size, size)
    assert torch.allclose(msssim_score(x, x), torch.ones(2), atol=1e-4)
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert (msssim_score(x, noisy) < 0.95).all()


def test_photometric_loss_properties():
    x = shapes(torch.zeros(2), torch.zeros(2, 2))
    mask = torch.ones(2, 1, 48, 48)
    loss, score = photometric_loss(x, x, mask, alpha=1.0, beta=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)
    assert torch.allclose(score, torch.ones(2), atol=1e-4)
    losses = [photometric_loss(shapes(torch.full((2,), a), torch.zeros(2, 2)), x, mask, 1.0, 1.0)[0]
              for a in (0.05, 0.2, 0.5)]
    assert losses[0] < losses[1] < losses[2]  # more misalignment, more loss
    # Outside the mask nothing counts.
    mask[..., :, 24:] = 0
    other = x.clone()
    other[..., :, 24:] = torch.rand_like(other[..., :, 24:])
    assert photometric_loss(other, x, mask, 1.0, 1.0)[0].item() == pytest.approx(0.0, abs=1e-4)


def test_pose_loss_is_four_times_one_minus_cos():
    angle = (torch.rand(8) * 2 - 1) * math.pi
    theta = similarity_theta(angle, torch.zeros(8, 2), torch.zeros(8))
    expected = (4 * (1 - torch.cos(angle))).mean()
    assert pose_loss(theta, identity_theta(8)).item() == pytest.approx(expected.item(), rel=1e-4)


# ---------------------------------------------------------------------------- congealing


def test_congeal_recovers_relative_poses():
    n = 12
    angles = (torch.rand(n) * 2 - 1) * math.pi
    shifts = (torch.rand(n, 2) * 2 - 1) * 0.08
    images = shapes(angles, shifts, size=64)
    poses, template = congeal(images)
    assert template.shape == (3, 64, 64)
    truth = similarity_theta(angles, shifts, torch.zeros(n))  # canonical frame -> image
    residual = compose(invert_theta(truth), poses)
    i, j = torch.triu_indices(n, n, 1)
    pairwise = compose(invert_theta(residual[i]), residual[j])
    # Worst pair over 30 seeded draws: 3.2 deg, 1.6 px (the old 3 deg / 1.5 px bounds failed
    # ~1 draw in 8); an unregistered pair is off by up to 180 deg and ~5 px.
    assert theta_pose(pairwise)["rotation_deg"].abs().max() < 5.0
    assert (pairwise[:, :, 2] * 32).norm(dim=-1).max() < 2.5  # pixels


# ---------------------------------------------------------------------------- training


# Short trainings that test other properties than the collapse check: no retries, and a
# weak STN kept (with a warning) instead of an error.
UNCHECKED = {"retries": 0, "accept_weak": True}


def aligned_set(n, size=48):
    return shapes((torch.rand(n) * 2 - 1) * 0.02, (torch.rand(n, 2) * 2 - 1) * 0.01, size)


def test_train_stn_reduces_alignment_error():
    images = aligned_set(24)
    held_out = aligned_set(8)
    stn = STN(width=8)
    before = measure_alignment(stn, held_out, rotation=30.0, translation=0.1)
    history = train_stn(stn, images, epochs=8, samples_per_epoch=128, batch_size=16,
                        image_size=48, rotation=30.0, translation=0.1, progress=False,
                        seed=int(torch.randint(0, 1000, ()).item()))
    after = measure_alignment(stn, held_out, rotation=30.0, translation=0.1)
    assert after["rotation_deg"] < 0.5 * before["rotation_deg"]
    assert history["val_loss"][history["best_epoch"]] < history["val_loss"][0]
    assert not stn.training
    assert set(history) >= {"train_loss", "val_loss", "val_msssim", "best_epoch", "epochs_run",
                            "seconds", "val_alignment"}


def test_validation_split_is_disjoint_and_never_trained_on():
    images = aligned_set(10, size=32)
    kwargs = dict(epochs=2, samples_per_epoch=16, batch_size=8, image_size=32, patience=5,
                  progress=False, seed=3, **UNCHECKED)
    first = train_stn(STN(width=4), images, **kwargs)
    train_idx, val_idx = set(first["train_indices"]), set(first["val_indices"])
    assert not train_idx & val_idx and train_idx | val_idx == set(range(10)) and len(val_idx) == 2
    # Replacing the validation images changes the validation loss, not the training.
    other = images.clone()
    other[first["val_indices"]] = torch.rand(2, 3, 32, 32)
    torch.manual_seed(0)
    a = train_stn(STN(width=4), images, **kwargs)
    torch.manual_seed(0)
    b = train_stn(STN(width=4), other, **kwargs)
    assert a["train_loss"] == b["train_loss"]
    assert a["val_loss"] != b["val_loss"]


def test_train_stn_canonical_runs_and_measures_consistency():
    images = shapes((torch.rand(10) * 2 - 1) * math.pi, torch.zeros(10, 2), size=32)
    history = train_stn(STN(width=4), images, objective="canonical", epochs=1,
                        samples_per_epoch=16, batch_size=8, image_size=32, progress=False,
                        **UNCHECKED)
    alignment = history["val_alignment"]
    assert alignment["n_images"] == 2 and alignment["rotation_deg"] >= 0
    assert alignment["n_views"] == 2 * 8  # CHECK_VIEWS view pairs per held-out image
    assert len(history["val_msssim"]) == 1


def test_measure_alignment_of_the_identity_is_the_transform_itself():
    images = aligned_set(6, size=32)
    seed = int(torch.randint(0, 1000, ()).item())
    result = measure_alignment(STN(), images, rotation=20.0, translation=0.1, scale=1.0, seed=seed)
    views = random_similarity(6, 20.0, 0.1, 1.0, torch.Generator().manual_seed(seed))
    expected = theta_pose(views)["rotation_deg"].abs().mean().item()
    assert result["rotation_deg"] == pytest.approx(expected, abs=1e-3)
    shift = (views[:, :, 2] * 16).norm(dim=-1).mean().item()
    assert result["translation_px"] == pytest.approx(shift, abs=1e-3)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"objective": "invariance"}, ValueError, "objective"),
    ({"epochs": 0}, ValueError, "epochs"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"lr": 0.0}, ValueError, "lr"),
    ({"alpha": -1.0}, ValueError, "loss weights"),
    ({"val_fraction": 1.0}, ValueError, "val_fraction"),
    ({"scale": 0.5}, ValueError, "scale >= 1"),
    ({"augment_padding": "wrap"}, ValueError, "augment_padding"),
])
def test_train_stn_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        train_stn(STN(width=4), aligned_set(4, size=32), progress=False, **kwargs)


def test_train_stn_rejects_bad_images():
    with pytest.raises(InputError, match="at least 2 images"):
        train_stn(STN(width=4), aligned_set(1, size=32), progress=False)
    with pytest.raises(InputError, match="float"):
        train_stn(STN(width=4), torch.zeros(4, 3, 32, 32, dtype=torch.int16), progress=False)
    with pytest.raises(TypeError, match="STN"):
        train_stn(torch.nn.Identity(), aligned_set(4, size=32), progress=False)


# ---------------------------------------------------------------------------- collapse check


def test_a_stuck_stn_is_retried_from_new_seeds_with_more_epochs_then_fails_loudly():
    """Issue 19: lr ~ 0 keeps the STN at the identity (a collapse). Every try is checked on
    held-out views; after its retries train_stn raises, naming the numbers."""
    images = aligned_set(12, size=32)
    seed = int(torch.randint(0, 1000, ()).item())
    kwargs = dict(epochs=1, samples_per_epoch=16, batch_size=8, image_size=32, lr=1e-12,
                  progress=False, seed=seed)
    with pytest.raises(WeakSTNError, match=r"error ratio 1\.0\d > 0\.5 after 3 tries") as error:
        train_stn(STN(width=4, seed=seed), images, retries=2, **kwargs)
    assert "deg" in str(error.value) and "--accept-weak-stn" in str(error.value)
    assert isinstance(error.value, InputError)  # the CLI's one-line exit 2
    stn = STN(width=4, seed=seed)
    with pytest.warns(UserWarning, match="kept as asked"):
        history = train_stn(stn, images, retries=2, accept_weak=True, **kwargs)
    attempts = history["attempts"]
    assert [a["epochs"] for a in attempts] == [1, 2, 4]
    assert attempts[0]["seed"] == seed and len({a["seed"] for a in attempts}) == 3
    assert not any(a["passed"] for a in attempts) and history["retries"] == 2
    assert history["accepted_weak"] and stn.record["accepted_weak"]
    assert stn.record["alignment"]["error_ratio"] == pytest.approx(1.0, abs=0.05)
    # The same seed gives the same retry seeds.
    again = train_stn(STN(width=4, seed=seed), images, retries=2, accept_weak=True, **kwargs)
    assert [a["seed"] for a in again["attempts"]] == [a["seed"] for a in attempts]


def test_a_failed_try_is_retrained_and_the_retry_kept(monkeypatch):
    """The first try is sabotaged (its learning rate ~ 0): the check fails it, the retry
    (new weights, twice the epochs) learns, and its weights are the ones kept."""
    from stnpadim_ext.models.stn import train as train_module

    real = train_module._train_once
    calls = []

    def first_try_stuck(stn, step, split, epochs, samples, batch, lr, *rest):
        calls.append(epochs)
        return real(stn, step, split, epochs, samples, batch, 1e-12 if len(calls) == 1 else lr, *rest)

    monkeypatch.setattr(train_module, "_train_once", first_try_stuck)
    stn = STN(width=8, seed=0)
    history = train_stn(stn, aligned_set(24), epochs=8, samples_per_epoch=128, batch_size=16,
                        image_size=48, rotation=30.0, translation=0.1, progress=False, seed=0)
    assert calls == [8, 16]
    assert [a["passed"] for a in history["attempts"]] == [False, True]
    assert history["retries"] == 1 and not history["accepted_weak"]
    assert stn.record["retries"] == 1 and stn.record["alignment"]["error_ratio"] <= 0.5
    after = measure_alignment(stn, aligned_set(8), rotation=30.0, translation=0.1, seed=5)
    assert after["error_ratio"] < 0.5


def test_reset_parameters_draws_the_weights_stn_seed_would():
    a, b = STN(width=4, seed=5), STN(width=4, seed=9)
    b.centring.fill_(2.0)
    b.record = {"anything": 1}
    b.reset_parameters(5)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert b.record is None


def test_measure_alignment_beside_not_warping():
    images = aligned_set(6, size=32)
    result = measure_alignment(STN(width=4), images, rotation=20.0, translation=0.1, views_per_image=3)
    assert result["n_views"] == 18 and result["n_images"] == 6
    # An untrained STN is the identity: its errors are not warping's.
    for key in ("rotation_deg", "translation_px", "displacement_px"):
        assert result[key] == pytest.approx(result[f"identity_{key}"], rel=1e-4)
    assert result["error_ratio"] == pytest.approx(1.0, rel=1e-4)


def test_residual_errors_modulo_symmetry_and_in_pixels():
    from stnpadim_ext.models.stn.train import _residual_errors

    turn = similarity_theta(torch.tensor([math.radians(183.0)]), torch.zeros(1, 2), torch.zeros(1), aspect=1.5)
    plain, sym = _residual_errors(turn, 1, (32, 48)), _residual_errors(turn, 2, (32, 48))
    assert plain["rotation"].item() == pytest.approx(177.0, abs=1e-3)
    assert sym["rotation"].item() == pytest.approx(3.0, abs=1e-3)
    shift = similarity_theta(torch.zeros(1), torch.tensor([[0.25, -0.5]]), torch.zeros(1), aspect=1.5)
    errors = _residual_errors(shift, 1, (32, 48))
    # (0.25 * 48 / 2, 0.5 * 32 / 2) = (6, 8) pixels, the same for every pixel.
    assert errors["translation"].item() == pytest.approx(10.0, abs=1e-4)
    assert errors["displacement"].item() == pytest.approx(10.0, abs=1e-4)


# ---------------------------------------------------------------------------- seeds, centring


def test_stn_seed_fixes_the_initial_weights_and_leaves_the_global_generator_alone():
    state = torch.random.get_rng_state()
    a, b, c = STN(width=4, seed=7), STN(width=4, seed=7), STN(width=4, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.features[0].weight, c.features[0].weight)


def test_train_stn_same_seed_same_bits():
    """Same seed, same thread count (1, from the fixture): bit-identical trained weights."""
    images = aligned_set(10, size=32)
    kwargs = dict(epochs=2, samples_per_epoch=32, batch_size=8, image_size=32, progress=False,
                  **UNCHECKED)
    seed = int(torch.randint(0, 1000, ()).item())
    runs = []
    for _ in range(2):
        torch.manual_seed(int(torch.randint(0, 1000, ()).item()))  # the global state must not matter
        stn = STN(width=4, seed=seed)
        history = train_stn(stn, images, seed=seed, **kwargs)
        runs.append((stn.state_dict(), history))
    (first, h1), (second, h2) = runs
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert h1["train_loss"] == h2["train_loss"] and h1["centring"] == h2["centring"]
    other = STN(width=4, seed=seed + 1)
    train_stn(other, images, seed=seed + 1, **kwargs)
    assert not torch.equal(other.head.weight, first["head.weight"])


def _pose_of(theta):
    pose = theta_pose(theta)
    angle = torch.deg2rad(pose["rotation_deg"])
    return torch.atan2(angle.sin().mean(), angle.cos().mean()), pose["log_scale"].mean()


def test_centring_theta_puts_the_mean_pose_at_the_identity():
    gen = torch.Generator().manual_seed(0)
    n = 12
    theta = similarity_theta(0.3 + 0.1 * torch.randn(n, generator=gen), 0.2 + 0.05 * torch.randn(n, 2, generator=gen),
                             -0.04 + 0.02 * torch.randn(n, generator=gen))
    centred = compose(theta, centring_theta(theta).expand(n, 2, 3))
    angle, log_scale = _pose_of(centred)
    assert abs(angle) < 1e-5 and abs(log_scale) < 1e-5
    # Least-squares centring: no output-frame shift brings the output centres closer to the
    # input centre (the normal equations sum_i L_i^T t_i = 0 hold).
    normal = (centred[:, :, :2].transpose(1, 2) @ centred[:, :, 2:]).sum(0)
    torch.testing.assert_close(normal, torch.zeros(2, 1), atol=1e-5, rtol=0)
    # A set of one transform: its mean pose is itself, its centring its inverse.
    one = theta[:1]
    torch.testing.assert_close(invert_theta(centring_theta(one)), one, atol=1e-5, rtol=0)
    torch.testing.assert_close(compose(one, centring_theta(one)), identity_theta(1), atol=1e-5, rtol=0)


def test_train_stn_centres_an_aligned_training_set_on_the_identity():
    images = aligned_set(12, size=32)
    stn = STN(width=4, seed=1)
    history = train_stn(stn, images, epochs=2, samples_per_epoch=32, batch_size=8, image_size=32,
                        progress=False, seed=1, **UNCHECKED)
    assert set(history["centring"]) == {"rotation_deg", "log_scale", "translation"}
    with torch.no_grad():
        theta = stn.predict_theta(F.interpolate(images, size=(32, 32), mode="bilinear",
                                                antialias=True, align_corners=False))
    angle, log_scale = _pose_of(theta)
    assert abs(math.degrees(angle)) < 1e-3 and abs(log_scale) < 1e-5
    # Without centring the same training leaves its own constant warp in place.
    raw = STN(width=4, seed=1)
    assert train_stn(raw, images, epochs=2, samples_per_epoch=32, batch_size=8, image_size=32,
                     progress=False, seed=1, centre=False, **UNCHECKED)["centring"] is None
    assert torch.equal(raw.centring, identity_theta(1))


def test_state_dict_without_centring_loads_as_identity():
    stn = STN(width=4, seed=0)
    state = {k: v for k, v in stn.state_dict().items() if k != "centring"}
    stn.centring.fill_(3.0)
    stn.load_state_dict(state)
    assert torch.equal(stn.centring, identity_theta(1))


# ---------------------------------------------------------------------------- acceptance


@pytest.mark.slow
def test_reconstruct_stn_undoes_test_drift_within_3_degrees(tmp_path):
    """Issue 6: trained on an aligned category, the STN recovers test drift of up to
    +-30 deg (plus shifts) with mean error under 3 deg, read against the true poses."""
    from stnpadim_ext.data.synth import make_dataset

    seed = int(torch.randint(0, 1000, ()).item())
    make_dataset(tmp_path, categories=["part_drift"], seed=seed, image_size=128, n_train=40,
                 n_test_good=24, n_test_defect=1, progress=False)
    folder = tmp_path / "part_drift"
    stn = STN()
    train_stn(stn, sorted((folder / "train" / "good").iterdir()), objective="reconstruct",
              seed=seed, progress=False)
    meta = json.loads((folder / "meta.json").read_text())
    items = [(p, r) for p, r in meta["images"].items() if p.startswith("test/good/")]
    images = torch.stack([sp.data.load_image(folder / p) for p, _ in items])
    truth = torch.tensor([r["theta"] for _, r in items])
    assert max(abs(r["angle"]) for _, r in items) > 15  # the drift is really there
    with torch.no_grad():
        residual = compose(invert_theta(truth), stn.predict_theta(images))
    error = theta_pose(residual)["rotation_deg"].abs()
    assert error.mean() < 3.0, f"mean rotation error {error.mean():.2f} deg"
    assert (residual[:, :, 2] * 64).norm(dim=-1).mean() < 3.0  # pixels at 128 px


# ---------------------------------------------------------------------------- posed views


def test_posed_batches_are_seeded_and_read_files_like_tensors(tmp_path):
    from PIL import Image

    from stnpadim_ext.models.stn.poses import posed_batches

    images = torch.rand(5, 3, 24, 24)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(paths[-1])
    pixels = torch.stack([sp.data.load_image(p) for p in paths])
    ranges = {"rotation": 30.0, "translation": 0.1, "scale": 1.1}
    seed = int(torch.randint(0, 1000, ()).item())
    from_files = list(posed_batches(paths, ranges, seed, batch_size=3, n_views=12))
    from_tensor = list(posed_batches(pixels, ranges, seed, batch_size=3, n_views=12))
    assert [x.shape[0] for x, _, _ in from_files] == [3, 3, 3, 3]
    for (x1, v1, p1), (x2, v2, p2) in zip(from_files, from_tensor, strict=True):
        assert torch.equal(x1, x2) and torch.equal(v1, v2) and p1 is None and p2 is None
    # Every image is seen before any is seen again (a pass per 5 views).
    seen = [next(i for i in range(5) if torch.equal(x, pixels[i])) for b, _, _ in from_files for x in b]
    assert sorted(seen[:5]) == list(range(5)) and sorted(seen[5:10]) == list(range(5))
    other = list(posed_batches(paths, ranges, seed + 1, batch_size=3, n_views=12))
    assert not torch.equal(other[0][1], from_files[0][1])
    poses = {p: [[1.0, 0.0, 0.1 * i], [0.0, 1.0, 0.0]] for i, p in enumerate(paths)}
    for x, views, known in posed_batches(paths, None, seed, batch_size=2, poses=poses):
        assert views is None and known.shape == (x.shape[0], 2, 3)
