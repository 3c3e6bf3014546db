"""Conformal calibration: the threshold rule, the hold-out split, the model API, model files,
and the guarantee itself, measured on synthetic good images."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import stnpadim_ext as sp
from stnpadim_ext.cli.experiment import ModelOptions, fit_model
from stnpadim_ext.data import list_images, make_dataset
from stnpadim_ext.errors import InputError
from stnpadim_ext.models.padim.calibration import (
    Calibration,
    conformal_calibration,
    decide,
    holdout_size,
    min_images,
    split_holdout,
)
from stnpadim_ext.models.padim.serialization import read_model_file, write_model_file

SIZE = 64


@pytest.fixture(scope="module")
def good_paths(tmp_path_factory) -> list:
    """330 good 64 px fabric images (30 to fit, 300 to calibrate and test on)."""
    root = tmp_path_factory.mktemp("many_good")
    make_dataset(root, categories=["fabric"], image_size=SIZE, n_train=330, n_test_good=0,
                 n_test_defect=0, seed=11, progress=False)
    return list_images(root / "fabric" / "train" / "good")


@pytest.fixture(scope="module")
def fitted(good_paths) -> sp.PaDiM:
    return sp.PaDiM(image_size=SIZE, progress=False).fit(good_paths[:30])


@pytest.mark.parametrize("n, alpha", [(19, 0.1), (99, 0.01), (40, 0.05), (7, 0.3), (1000, 0.001)])
def test_conformal_rank_is_ceil_n_plus_1_times_1_minus_alpha(n, alpha):
    scores = torch.rand(n, dtype=torch.float64) * 100
    cal = conformal_calibration(scores, alpha)
    # Brute force: the smallest k with k / (n + 1) >= 1 - alpha, in exact rational arithmetic.
    from fractions import Fraction

    k = next(k for k in range(1, n + 1) if Fraction(k, n + 1) >= 1 - Fraction(str(alpha)))
    assert cal.threshold == pytest.approx(float(scores.sort().values[k - 1]))
    assert cal.guaranteed_rate == pytest.approx((n + 1 - k) / (n + 1)) and cal.guaranteed_rate <= alpha
    assert cal.n == n and cal.note is None
    levels = [q for q, _ in cal.quantiles]
    assert levels[0] == 0.0 and levels[-1] == 1.0
    assert cal.quantiles[0][1] == pytest.approx(float(scores.min()))
    assert cal.quantiles[-1][1] == pytest.approx(float(scores.max()))


def test_too_few_images_use_the_max_and_say_which_rate_they_support():
    scores = torch.tensor([3.0, 1.0, 4.0, 1.5, 9.0])
    cal = conformal_calibration(scores, 0.01)
    assert cal.threshold == 9.0 and cal.guaranteed_rate == pytest.approx(1 / 6)
    note = cal.note
    assert "\n" not in note and "0.167" in note and "99 images" in note and "0.01" in note


@pytest.mark.parametrize("alpha", [0.5, 0.2, 0.1, 0.05, 0.01, 0.003, 0.001])
def test_min_images_is_the_smallest_n_that_supports_alpha(alpha):
    n = min_images(alpha)
    assert conformal_calibration(torch.rand(n), alpha).note is None
    if n > 1:
        assert conformal_calibration(torch.rand(n - 1), alpha).note is not None


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, "x", float("nan")])
def test_bad_alpha_is_an_input_error(bad):
    with pytest.raises(InputError, match="false_reject_rate"):
        conformal_calibration(torch.rand(10), bad)


def test_no_scores_or_nan_scores_are_input_errors():
    with pytest.raises(InputError, match="at least one"):
        conformal_calibration(torch.empty(0), 0.1)
    with pytest.raises(InputError, match="NaN"):
        conformal_calibration(torch.tensor([1.0, float("nan")]), 0.1)


@pytest.mark.parametrize("n, expected", [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (8, 2), (48, 12), (79, 19),
                                         (80, 20), (209, 21), (391, 40)])
def test_holdout_size_ten_percent_at_least_20_when_a_quarter_allows(n, expected):
    assert holdout_size(n) == expected


def test_split_holdout_is_seeded_disjoint_and_complete():
    paths = [f"img{i:03d}.png" for i in range(100)]
    fit, held = split_holdout(paths, seed=3)
    assert len(held) == 20 and len(fit) == 80
    assert sorted(fit + held) == paths and not set(fit) & set(held)
    assert fit == sorted(fit) and held == sorted(held)  # input order kept
    assert split_holdout(paths, seed=3) == (fit, held)
    assert split_holdout(paths, seed=4)[1] != held


def test_calibration_config_round_trip_and_damage():
    cal = conformal_calibration(torch.rand(30) + 1, 0.05)
    assert Calibration.from_config(cal.to_config()) == cal
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="out of range"):
            Calibration.from_config({**cal.to_config(), "threshold": bad})
    with pytest.raises(ValueError, match="must hold"):
        Calibration.from_config({"threshold": 1.0})
    with pytest.raises(ValueError, match="out of range"):
        Calibration.from_config({**cal.to_config(), "guaranteed_rate": 1.5})


def test_calibration_records_the_poses_it_was_scored_in():
    ranges = {"rotation": 40.0, "translation": 0.15, "scale": 1.1}
    cal = conformal_calibration(torch.rand(30) + 1, 0.05, ranges)
    assert cal.pose_ranges == ranges and Calibration.from_config(cal.to_config()) == cal
    older = {k: v for k, v in cal.to_config().items() if k != "pose_ranges"}  # written before
    assert Calibration.from_config(older).pose_ranges is None
    with pytest.raises(InputError, match="pose_ranges.rotation"):
        Calibration.from_config({**cal.to_config(), "pose_ranges": {**ranges, "rotation": -5.0}})


def test_decide_normalizes_and_masks_at_the_threshold():
    maps = torch.rand(4, 8, 8) * 10
    scores = maps.flatten(1).amax(1)
    result = decide(scores, maps, 5.0)
    torch.testing.assert_close(result.normalized_scores, scores / 5.0)
    assert torch.equal(result.anomalous, result.normalized_scores > 1)
    assert torch.equal(result.masks, maps > 5.0)
    # One threshold for images and pixels: an image is anomalous iff its mask is not empty.
    assert torch.equal(result.anomalous, result.masks.flatten(1).any(1))
    s, m = result  # unpacks like predict
    assert s is scores and m is maps
    bare = decide(scores, maps, None)
    assert bare.normalized_scores is None and bare.anomalous is None and bare.masks is None


# ---------------------------------------------------------------------------- the model


def test_model_calibrate_decide_save_load(fitted, good_paths, tmp_path):
    model = fitted
    assert model.threshold is None
    calibration = good_paths[30:130]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 100 images support alpha = 0.05: no warning
        assert model.calibrate(calibration, false_reject_rate=0.05) is model
    scores, _ = model.predict(calibration)
    assert model.threshold == pytest.approx(float(scores.sort().values[96 - 1]))  # ceil(101 * 0.95)
    assert model.calibration.n == 100 and model.calibration.alpha == 0.05

    result = model.decide(good_paths[130:140])
    scores, maps = model.predict(good_paths[130:140])
    torch.testing.assert_close(result.scores, scores)
    assert torch.equal(result.anomalous, scores > model.threshold)
    assert result.masks.shape == maps.shape and result.masks.dtype == torch.bool
    torch.testing.assert_close(sp.score(model, good_paths[130:140]).normalized_scores,
                               scores / model.threshold)

    path = model.save(tmp_path / "m.padim")
    loaded = sp.load(path, progress=False)
    assert loaded.calibration == model.calibration
    s, _ = sp.score(path, good_paths[130:140])  # backward compatible: two values
    torch.testing.assert_close(s, scores)


def test_model_files_without_calibration_load_uncalibrated(fitted, good_paths, tmp_path):
    model = sp.PaDiM(image_size=SIZE, progress=False).fit(good_paths[:10])
    path = model.save(tmp_path / "new.padim")
    config, tensors = read_model_file(path)
    del config["calibration"]  # what files written before calibration existed hold
    old = write_model_file(tmp_path / "old.padim", config, tensors)
    loaded = sp.load(old, progress=False)
    assert loaded.threshold is None and loaded.calibration is None
    result = sp.score(loaded, good_paths[10:12])
    assert result.anomalous is None and result.scores.shape == (2,)
    # A damaged calibration entry is a damaged file, named, not a crash later.
    config["calibration"] = {"threshold": "x"}
    damaged = write_model_file(tmp_path / "damaged.padim", config, tensors)
    with pytest.raises(InputError, match="damaged.padim: damaged stnpadim model file"):
        sp.load(damaged)


def test_refit_drops_the_threshold_and_small_sets_warn(good_paths):
    model = sp.PaDiM(image_size=SIZE, progress=False).fit(good_paths[:10])
    with pytest.warns(UserWarning, match="cannot support a false-reject rate of 0.01"):
        model.calibrate(good_paths[10:15])
    assert model.calibration.guaranteed_rate == pytest.approx(1 / 6)
    model.fit(good_paths[:10])
    assert model.threshold is None


def test_fit_model_holds_out_calibration_images_from_the_gaussians(good_paths):
    train = good_paths[:40]
    options = ModelOptions(stn="none", image_size=SIZE, seed=5, false_reject_rate=0.1)
    model, _ = fit_model(train, options, progress=False)
    fit, held = split_holdout(train, seed=5)
    assert model.calibration.n == len(held) == 10 and model.calibration.alpha == 0.1
    reference = sp.PaDiM(image_size=SIZE, seed=5, progress=False).fit(fit)
    for name, tensor in reference.gaussian.state_dict().items():
        torch.testing.assert_close(model.gaussian.state_dict()[name], tensor)
    scores, _ = reference.predict(held)
    assert model.threshold == pytest.approx(float(scores.max()), rel=1e-5)  # k = ceil(11 * 0.9) = 10
    # A separate calibration folder: every training image fits the Gaussians.
    model, _ = fit_model(train, options, progress=False, calibration_paths=good_paths[40:60])
    assert model.calibration.n == 20
    reference = sp.PaDiM(image_size=SIZE, seed=5, progress=False).fit(train)
    torch.testing.assert_close(model.gaussian.state_dict()["mean"], reference.gaussian.state_dict()["mean"])


def test_false_reject_rate_on_unseen_good_images_meets_the_target(fitted, good_paths):
    """The guarantee, measured: alpha = 0.05, 100 calibration images, 200 unseen good ones.

    The model is fitted once on 30 images; its scores of 300 other good images are split
    at random (seeded) into calibration and test, 400 times. Over splits, the mean
    false-reject rate must equal 1 - k / (n + 1) (= 0.0495 <= 0.05; exact for exchangeable
    scores) within 4 standard errors, and 95% of splits must stay within three binomial
    standard deviations of alpha (no split's threshold far too low).
    """
    alpha, n_cal, repeats = 0.05, 100, 400
    scores, _ = fitted.predict(good_paths[30:])
    n_test = scores.numel() - n_cal
    rates, loose = [], []
    for r in range(repeats):
        order = torch.randperm(scores.numel(), generator=torch.Generator().manual_seed(r))
        cal, test = scores[order[:n_cal]], scores[order[n_cal:]]
        calibration = conformal_calibration(cal, alpha)
        rates.append(float((test > calibration.threshold).float().mean()))
        # The same with the rank one lower: the check below must be able to see that.
        loose.append(float((test > cal.sort().values[math.ceil((n_cal + 1) * (1 - alpha)) - 2]).float().mean()))
    rates, loose = np.array(rates), np.array(loose)
    expected = calibration.guaranteed_rate
    se = rates.std(ddof=1) / math.sqrt(repeats)
    print(f"false-reject rate on unseen good images: mean {rates.mean():.4f} (target {alpha}, "
          f"bound {expected:.4f}), sd over splits {rates.std(ddof=1):.4f}, "
          f"95th percentile {np.quantile(rates, 0.95):.4f}, max {rates.max():.4f}; "
          f"rank k-1: mean {loose.mean():.4f}")
    assert expected <= alpha
    assert abs(rates.mean() - expected) < 4 * se
    assert rates.mean() < alpha + 4 * se
    assert np.quantile(rates, 0.95) <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / n_cal)
    assert loose.mean() > alpha + 4 * se  # an off-by-one rank would fail the test above
    assert n_test == 200
