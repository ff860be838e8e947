"""realnet/metrics.py against hand-computed cases, sklearn and a direct transcription of
MVTec AD's own AU-PRO code (landscape §3: pro_curve_util.compute_pro + generic_util.trapezoid)."""

from bisect import bisect

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_curve, roc_auc_score

from realnet import metrics


# ----------------------------------------------------------------------------------------
# MVTec AD's evaluation code, transcribed as directly as possible (the ground truth)
# ----------------------------------------------------------------------------------------


def mvtec_compute_pro(anomaly_maps, ground_truth_maps):
    structure = np.ones((3, 3), dtype=int)
    num_ok_pixels = 0
    num_gt_regions = 0
    shape = (len(anomaly_maps), anomaly_maps[0].shape[0], anomaly_maps[0].shape[1])
    fp_changes = np.zeros(shape, dtype=np.uint32)
    pro_changes = np.zeros(shape, dtype=np.float64)
    for gt_ind, gt_map in enumerate(ground_truth_maps):
        labeled, n_components = ndi.label(gt_map, structure)
        num_gt_regions += n_components
        ok_mask = labeled == 0
        num_ok_pixels += np.sum(ok_mask)
        fp_change = np.zeros_like(gt_map, dtype=fp_changes.dtype)
        fp_change[ok_mask] = 1
        pro_change = np.zeros_like(gt_map, dtype=np.float64)
        for k in range(n_components):
            region_mask = labeled == (k + 1)
            pro_change[region_mask] = 1.0 / np.sum(region_mask)
        fp_changes[gt_ind] = fp_change
        pro_changes[gt_ind] = pro_change
    anomaly_scores_flat = np.array(anomaly_maps).ravel()
    fp_changes_flat = fp_changes.ravel()
    pro_changes_flat = pro_changes.ravel()
    sort_idxs = np.argsort(anomaly_scores_flat).astype(np.uint32)[::-1]
    anomaly_scores_sorted = anomaly_scores_flat[sort_idxs]
    fp_changes_sorted = fp_changes_flat[sort_idxs]
    pro_changes_sorted = pro_changes_flat[sort_idxs]
    fprs = np.cumsum(fp_changes_sorted).astype(np.float32) / num_ok_pixels
    pros = np.cumsum(pro_changes_sorted) / num_gt_regions
    keep_mask = np.append(np.diff(anomaly_scores_sorted) != 0, np.True_)
    fprs = np.clip(fprs[keep_mask], None, 1.0)
    pros = np.clip(pros[keep_mask], None, 1.0)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))


def mvtec_trapezoid(x, y, x_max):
    x, y = np.array(x), np.array(y)
    correction = 0.0
    if x_max not in x:
        ins = bisect(x, x_max)
        assert 0 < ins < len(x)
        y_interp = y[ins - 1] + (
            (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        )
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    mask = x <= x_max
    x, y = x[mask], y[mask]
    return np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction


def mvtec_au_pro(maps, masks, limit=0.3):
    fpr, pro = mvtec_compute_pro(list(maps), list(masks))
    return mvtec_trapezoid(fpr, pro, limit) / limit


def random_case(rng, n=12, size=24, levels=None, empty_share=0.3):
    """Maps with blob-shaped defects that score higher on average; `levels` quantises the
    scores so that many ties occur."""
    masks = np.zeros((n, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        if rng.random() < empty_share:
            continue
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.integers(0, size), rng.integers(0, size), rng.integers(1, size // 4)
            masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    maps = rng.random(masks.shape).astype(np.float32) + 0.6 * masks * rng.random(masks.shape)
    if levels:
        maps = np.round(maps * levels) / levels
    return maps.astype(np.float32), masks


# ----------------------------------------------------------------------------------------
# AU-PRO: hand-computed cases
# ----------------------------------------------------------------------------------------


def row(values):
    return np.array([[values]], dtype=np.float32)  # one image of one row


def test_au_pro_one_region_with_interpolation():
    # region {0,1} (size 2), four defect-free pixels. Descending: 0.9 R -> (0, .5);
    # 0.8 ok -> (.25, .5); 0.7 R -> (.25, 1); 0.6 ok -> (.5, 1) ... up to 0.3:
    # .25 * .5 + (.3 - .25) * 1 = .175 (interpolated at .3 on the flat (.25,1)-(.5,1))
    maps = row([0.9, 0.7, 0.8, 0.6, 0.4, 0.1])
    masks = row([1, 1, 0, 0, 0, 0])
    assert metrics.au_pro(maps, masks) == pytest.approx(0.175 / 0.3, abs=1e-12)
    assert mvtec_au_pro(maps, masks) == pytest.approx(0.175 / 0.3, abs=1e-7)


def test_au_pro_averages_over_regions_not_pixels():
    # image 1: region A of 4 pixels, image 2: region B of 1 pixel; 7 defect-free pixels.
    # 0.95 hits 1/4 of A -> PRO (1/4)/2 = .125; 0.6 ok -> FPR 1/7; 0.5 hits all of B ->
    # PRO .125 + .5 = .625; 0.4 ok -> 2/7; 0.3 ok -> 3/7 (> .3, flat at .625).
    maps = np.array(
        [[[0.95, 0.05, 0.05, 0.05, 0.6, 0.1]], [[0.5, 0.4, 0.3, 0.2, 0.1, 0.1]]], dtype=np.float32
    )
    masks = np.array([[[1, 1, 1, 1, 0, 0]], [[1, 0, 0, 0, 0, 0]]])
    area = 0.125 / 7 + 0.625 / 7 + 0.625 * (0.3 - 2 / 7)
    assert metrics.au_pro(maps, masks) == pytest.approx(area / 0.3, abs=1e-12)
    assert mvtec_au_pro(maps, masks) == pytest.approx(area / 0.3, abs=1e-7)


def test_au_pro_region_with_a_hole_and_diagonal_connectivity():
    # a ring of 8 pixels around a defect-free hole; the hole and the ring score 1: the
    # hole is a false positive (MVTec does not fill holes; the authors' code fills them in
    # the numerator and can report PRO > 1). The corner pixel (4,4) touches the ring only
    # diagonally: 8-connectivity makes it part of the same region (size 9).
    masks = np.zeros((1, 6, 6), dtype=np.uint8)
    masks[0, 1:4, 1:4] = 1
    masks[0, 2, 2] = 0
    masks[0, 4, 4] = 1
    maps = np.zeros((1, 6, 6), dtype=np.float32)
    maps[0, 1:4, 1:4] = 1.0
    maps[0, 4, 4] = 0.5
    _, n_regions = metrics.defect_regions(masks > 0)
    assert n_regions == 1
    n_ok = 36 - 9
    # 1.0: 8 region pixels + the hole -> (1/27, 8/9); 0.5 -> (1/27, 1); flat after
    area = 0.5 * (8 / 9) / n_ok + (0.3 - 1 / n_ok) * 1.0
    assert metrics.au_pro(maps, masks) == pytest.approx(area / 0.3, abs=1e-12)
    assert mvtec_au_pro(maps, masks) == pytest.approx(area / 0.3, abs=1e-7)
    fpr, pro = metrics.pro_curve(maps, masks)
    assert pro.max() <= 1.0


def test_au_pro_merges_tied_scores():
    # the region pixel ties with a defect-free pixel at 0.5: merged, the curve goes
    # straight from (0, 0) to (1/3, 1), PRO(.3) = .9, area .5 * .9 * .3. Taking the region
    # pixel first would give 1.0, taking the defect-free pixel first 0.0.
    maps = row([0.5, 0.5, 0.2, 0.1])
    masks = row([1, 0, 0, 0])
    assert metrics.au_pro(maps, masks) == pytest.approx(0.45, abs=1e-12)
    assert mvtec_au_pro(maps, masks) == pytest.approx(0.45, abs=1e-7)


def test_au_pro_when_the_curve_jumps_past_the_limit():
    # one defect-free pixel at 0.8, the other eight tie at 0: the curve has no point
    # between FPR 1/9 and 1. The authors' code keeps only FPR <= .3 and stretches those
    # to [0, 1]; MVTec interpolates on the segment to (1, 1).
    maps = row([0.5, 0.8] + [0.0] * 8)
    masks = row([1] + [0] * 9)
    assert metrics.au_pro(maps, masks) == pytest.approx((0.3 - 1 / 9) / 0.3, abs=1e-12)
    # the region pixel ties with the eight zeros: (1/9, 0) then straight to (1, 1)
    maps = row([0.0, 0.8] + [0.0] * 8)
    y = (0.3 - 1 / 9) / (8 / 9)
    expected = 0.5 * y * (0.3 - 1 / 9) / 0.3
    assert metrics.au_pro(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert mvtec_au_pro(maps, masks) == pytest.approx(expected, abs=1e-7)


def test_au_pro_without_regions_is_none():
    maps = np.random.default_rng(0).random((3, 8, 8))
    assert metrics.au_pro(maps, np.zeros((3, 8, 8))) is None
    assert metrics.pixel_auroc(maps, np.zeros((3, 8, 8))) is None


def test_au_pro_perfect_and_inverted_detectors():
    rng = np.random.default_rng(1)
    _, masks = random_case(rng, empty_share=0.0)
    perfect = masks.astype(np.float32) + 0.01 * rng.random(masks.shape).astype(np.float32)
    assert metrics.au_pro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    assert metrics.au_pro(-perfect, masks) == pytest.approx(0.0, abs=1e-12)  # no flipping
    assert metrics.pixel_auroc(-perfect, masks) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------------
# AU-PRO: against MVTec's code on random data, with and without ties, several limits
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 20, 3])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_au_pro_matches_mvtec(seed, levels, limit):
    rng = np.random.default_rng(seed)
    maps, masks = random_case(
        rng, n=int(rng.integers(1, 10)), size=int(rng.choice([8, 17, 32])), levels=levels
    )
    if not masks.any():
        masks[0, 0, 0] = 1
    ours = metrics.au_pro(maps, masks, fpr_limit=limit)
    assert ours == pytest.approx(mvtec_au_pro(maps, masks, limit), abs=1e-6)


def test_pro_curve_points_lie_on_mvtec_curve():
    rng = np.random.default_rng(7)
    maps, masks = random_case(rng, levels=10)
    fpr, pro = metrics.pro_curve(maps, masks)
    ref_fpr, ref_pro = mvtec_compute_pro(list(maps), list(masks))
    # every point of ours is a point of MVTec's curve (within float32 rounding of FPR)
    for x, y in zip(fpr, pro):
        assert np.any((np.abs(ref_fpr - x) < 1e-6) & (np.abs(ref_pro - y) < 1e-9)), (x, y)


# ----------------------------------------------------------------------------------------
# AUROC, F1 threshold, image scores
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [None, 5])
def test_pixel_auroc_matches_sklearn(levels):
    rng = np.random.default_rng(3)
    maps, masks = random_case(rng, levels=levels)
    expected = roc_auc_score(masks.ravel() > 0, maps.ravel())
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


def test_image_auroc_matches_sklearn_and_is_not_flipped():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 50)
    scores = np.round(rng.random(50) + 0.3 * labels, 1)  # ties
    assert metrics.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    worse = metrics.image_auroc(labels, -scores)
    assert worse < 0.5 and worse == pytest.approx(1 - roc_auc_score(labels, scores))
    assert metrics.image_auroc(np.zeros(5), scores[:5]) is None


@pytest.mark.parametrize("levels", [None, 7])
def test_f1_threshold_matches_sklearn(levels):
    rng = np.random.default_rng(5)
    maps, masks = random_case(rng, levels=levels)
    precision, recall, thresholds = precision_recall_curve(masks.ravel() > 0, maps.ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    threshold, best = metrics.f1_optimal_threshold(maps, masks)
    assert best == pytest.approx(f1.max(), abs=1e-12)
    assert threshold == pytest.approx(thresholds[np.argmax(f1)])
    assert metrics.f1_optimal_threshold(maps, np.zeros_like(masks)) == (None, None)


def test_image_scores_are_the_max_of_the_average_pooled_map():
    rng = np.random.default_rng(6)
    maps = rng.random((3, 40, 40)).astype(np.float32)
    got = metrics.image_scores(maps, pool=16)
    for i in range(3):
        windows = np.lib.stride_tricks.sliding_window_view(maps[i], (16, 16)).mean(axis=(2, 3))
        assert windows.shape == (25, 25)  # stride 1, no padding
        assert got[i] == pytest.approx(windows.max(), rel=1e-5)
    assert np.array_equal(metrics.image_scores(maps, pool="max"), maps.reshape(3, -1).max(axis=1))
    expected = (
        F.avg_pool2d(torch.from_numpy(maps)[:, None], 16, stride=1).amax(dim=(1, 2, 3)).numpy()
    )
    assert np.allclose(got, expected)


def test_shape_mismatch_and_nan_are_refused():
    with pytest.raises(ValueError, match="shape"):
        metrics.au_pro(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.pixel_auroc(np.full((1, 2, 2), np.nan), np.ones((1, 2, 2)))
