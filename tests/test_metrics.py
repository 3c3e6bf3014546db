"""Metrics against scikit-learn, hand-computed cases and a brute-force AUPRO."""
import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from stnpadim_ext.errors import InputError
from stnpadim_ext.metrics import (
    aupro,
    clustered_interval,
    image_auroc,
    image_f1,
    pixel_auroc,
    roc_curve,
    t_interval,
    threshold_metrics,
)


@pytest.fixture
def rng():
    return np.random.default_rng()


def _labels_scores(rng, n=60):
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(size=n) + labels, 1)  # rounding makes ties
    return labels, scores


def test_image_auroc_matches_sklearn(rng):
    for _ in range(5):
        labels, scores = _labels_scores(rng)
        assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert image_auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert image_auroc([0, 1], [0.5, 0.5]) == 0.5


def test_torch_and_list_inputs_agree(rng):
    labels, scores = _labels_scores(rng)
    expected = image_auroc(labels, scores)
    assert image_auroc(torch.tensor(labels).bool(), torch.tensor(scores)) == pytest.approx(expected)
    assert image_auroc(labels.tolist(), scores.tolist()) == pytest.approx(expected)
    masks = rng.random((3, 8, 8)) > 0.7
    maps = rng.random((3, 8, 8)).astype(np.float32)
    assert pixel_auroc(torch.from_numpy(masks), torch.from_numpy(maps)) == pytest.approx(pixel_auroc(masks, maps))
    assert aupro(torch.from_numpy(masks).to(torch.uint8), torch.from_numpy(maps)) == pytest.approx(aupro(masks, maps))


def test_pixel_auroc_matches_sklearn(rng):
    masks = np.zeros((4, 32, 32), bool)
    for m in masks:
        y, x = rng.integers(0, 24, 2)
        m[y:y + 8, x:x + 6] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    maps[0] = np.round(maps[0])  # ties
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_image_f1_matches_sklearn_best(rng):
    for _ in range(5):
        labels, scores = _labels_scores(rng)
        precision, recall, _ = precision_recall_curve(labels, scores)
        with np.errstate(invalid="ignore"):
            best = np.nanmax(2 * precision * recall / (precision + recall))
        assert image_f1(labels, scores) == pytest.approx(best, abs=1e-12)
    # by hand: thresholds .9 / .8 / .7 / .1 give F1 2/3, 1/2, 4/5 (P 2/3, R 1), 2/3
    assert image_f1([0, 0, 1, 1], [0.1, 0.8, 0.7, 0.9]) == pytest.approx(0.8)


def test_aupro_by_hand():
    # Two ground-truth regions: A = {(0,0), (0,1)} (size 2) and B = {(1,3)}; 5 normal pixels.
    masks = np.array([[[1, 1, 0, 0], [0, 0, 0, 1]]], bool)
    maps = np.array([[[0.9, 0.5, 0.8, 0.3], [0.2, 0.1, 0.0, 0.7]]])
    # thresholds 0.9: PRO (1/2 + 0)/2 = .25, FPR 0 | 0.8: FPR .2 | 0.7: PRO .75 | 0.5: PRO 1
    # area to FPR .3: .2 * .25 + .1 * 1 = .15 -> / .3 = .5 ; to FPR 1: .05 + .8 = .85
    assert aupro(masks, maps) == pytest.approx(0.5)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.85)
    # a tie between a normal and an anomalous pixel makes a slanted segment, interpolated
    # at the limit: FPR .25 -> .5 while PRO 0 -> 1, so PRO(.3) = .2, area .5*.2*.05
    masks = np.array([[1, 0, 0, 0, 0]], bool)
    maps = np.array([[0.5, 0.5, 0.9, 0.1, 0.0]])
    assert aupro(masks, maps) == pytest.approx(0.005 / 0.3)


def test_aupro_regions_are_8_connected_and_weighted_equally():
    masks = np.zeros((1, 6, 6), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region of 2 pixels
    masks[0, 4:6, 4:6] = True  # a second region of 4 pixels
    maps = np.zeros((1, 6, 6))
    maps[0, 0, 0] = 1.0  # half of the first region found, nothing else
    # curve (0, .25) -> (1, 1) with PRO = (1/2 + 0) / 2; 4-connectivity would give 3
    # regions and PRO (1 + 0 + 0) / 3 instead
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5 * (0.25 + 1.0))


def _aupro_brute(masks, maps, limit):
    """Straight from the definition, one threshold at a time."""
    regions = []
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labels == k) for k in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fpr = (above & normal).sum() / normal.sum()
        pro = np.mean([above[i][region].mean() for i, region in regions])
        points.append((fpr, pro))
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if x1 > x0 and x0 < limit:  # the part of each straight segment left of the limit
            end = min(x1, limit)
            y_end = y0 + (y1 - y0) * (end - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_end) * (end - x0)
    return area / limit


def test_aupro_matches_brute_force(rng):
    for _ in range(3):
        masks = np.zeros((3, 16, 16), bool)
        for m in masks[:2]:
            for _ in range(2):
                y, x = rng.integers(0, 12, 2)
                m[y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = True
        maps = np.round(rng.normal(size=masks.shape) + 1.2 * masks, 1)
        for limit in (0.3, 0.05, 1.0):
            assert aupro(masks, maps, limit) == pytest.approx(_aupro_brute(masks, maps, limit), abs=1e-12)


def test_aupro_extremes(rng):
    masks = rng.random((2, 16, 16)) > 0.8
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, (~masks).astype(float)) == pytest.approx(0.0)
    assert aupro(masks[0], rng.random((16, 16)) + masks[0]) == pytest.approx(1.0)  # one [H, W] map


def test_bad_inputs():
    with pytest.raises(InputError, match="same shape"):
        image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(InputError, match="same shape"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(InputError, match="all normal"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="all anomalous"):
        image_f1([1, 1], [0.1, 0.2])
    with pytest.raises(InputError, match="all normal"):
        aupro(np.zeros((2, 4, 4), bool), np.random.rand(2, 4, 4))
    with pytest.raises(InputError, match="binary"):
        pixel_auroc(np.full((4, 4), 0.5), np.random.rand(4, 4))
    with pytest.raises(InputError, match="NaN"):
        image_auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(InputError, match="empty"):
        image_auroc([], [])
    with pytest.raises(InputError, match="fpr_limit"):
        aupro(np.eye(4, dtype=bool), np.eye(4), fpr_limit=0.0)
    with pytest.raises(InputError, match=r"\[N, H, W\]"):
        aupro(np.eye(4, dtype=bool).ravel(), np.eye(4).ravel())


def test_threshold_metrics_counts():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.9, 0.5, 0.8, 0.3, 0.5])
    m = threshold_metrics(labels, scores, 0.5)  # flagged: 0.9 (good), 0.8 (defective); 0.5 is not > 0.5
    assert m["threshold"] == 0.5
    assert m["false_reject_rate"] == pytest.approx(1 / 4) and m["miss_rate"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(1 / 2) and m["recall"] == pytest.approx(1 / 3)
    assert m["f1_at_threshold"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    only_good = threshold_metrics(np.zeros(3), np.array([1.0, 2.0, 3.0]), 2.5)
    assert only_good["false_reject_rate"] == pytest.approx(1 / 3)
    assert only_good["miss_rate"] is None and only_good["recall"] is None


def test_roc_curve_matches_auroc():
    rng = np.random.default_rng()
    labels = rng.random(200) < 0.3
    labels[:2] = [True, False]
    scores = rng.normal(size=200) + labels
    fpr, tpr = roc_curve(labels, scores)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(image_auroc(labels, scores))


def test_t_interval_is_students():
    from scipy import stats

    values = np.random.default_rng().normal(0.9, 0.05, size=7)
    low, high = t_interval(values)
    expected = stats.t.interval(0.95, 6, loc=values.mean(), scale=stats.sem(values))
    assert (low, high) == pytest.approx(expected, rel=1e-12)
    narrow = t_interval(values, confidence=0.5)
    assert low < narrow[0] < values.mean() < narrow[1] < high
    assert t_interval([0.5]) is None and t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
    with pytest.raises(InputError, match="finite"):
        t_interval([0.5, float("nan")])


def test_clustered_interval_keeps_its_coverage_where_pooled_runs_do_not():
    """Issue 19: runs on one data seed share a data effect. 5 data seeds x 2 model seeds
    with data sd 0.1 and run sd 0.03: the t-interval over the 5 data-seed means covers the
    true mean ~95% of the time; one over the 10 runs taken as independent far less."""
    rng = np.random.default_rng(0)
    clustered = pooled = 0
    trials = 2000
    for _ in range(trials):
        data = rng.normal(0.0, 0.1, size=5)
        runs = data[:, None] + rng.normal(0.0, 0.03, size=(5, 2))
        low, high = clustered_interval(runs.tolist())
        clustered += low <= 0.0 <= high
        low, high = t_interval(runs.ravel())
        pooled += low <= 0.0 <= high
    assert 0.93 <= clustered / trials <= 0.97
    assert pooled / trials < 0.85
    assert clustered_interval([[0.5, 0.6]]) is None  # one cluster: no interval


