"""Anomaly-detection metrics, computed exactly and never flipped (docs/method.md, section 7).

    image_auroc(labels, scores)          sklearn's ROC AUC of per-image scores
    pixel_auroc(maps, masks)             ROC AUC over all pixels of all images
    au_pro(maps, masks, fpr_limit=0.3)   MVTec AD's AU-PRO, exactly as their evaluation code
    f1_optimal_threshold(maps, masks)    the pixel threshold with the best F1 (pictures only)
    image_scores(maps, pool=16)          max of the pool x pool average-pooled map
    compute_metrics, per_defect_metrics  evaluate.py's numbers of a test split, and of each
                                         defect type, with why one is not computed
    protocol(...)                        how metrics.json's numbers were computed, in words

An AUROC below 0.5 is reported as it is: a detector that ranks anomalies *below* normal
images is a bad detector, and `1 - auroc` would hide that (the authors' code, inherited
from UniAD, flips it).

Why the pixel metrics are not one sklearn call: MVTec AD's test set is 1,725 maps of
256 x 256, i.e. 113 million pixels. sklearn's `roc_curve` and MVTec's own `compute_pro`
both begin with an `argsort` of all of them (20 s here, and twice the memory); the
authors' PRO loop thresholds and relabels the whole set 1,000 times. Both metrics only
need *counts*, though: the AUROC is the Mann-Whitney statistic P(positive > negative)
(+ half the ties), and the PRO curve is determined by, for each score r of an anomalous
pixel, how many defect-free pixels score >= r and > r. Sorting the scores *values*
(numpy's SIMD sort, ten times faster than argsort) and `searchsorted` give those counts
with no argsort of the big array. The results are identical to sklearn's and to MVTec's
(tests/test_metrics.py compares them; benchmarks/bench_aupro.py times them).
"""

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from .model import ANOMALY_MAPS

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)  # MVTec labels defect regions with 8-connectivity


# ----------------------------------------------------------------------------------------
# Image level
# ----------------------------------------------------------------------------------------


def image_scores(maps, pool=16):
    """Image score = max of the anomaly map after a pool x pool average pooling (stride 1,
    no padding), the authors' choice. pool=1 (or 'max') is the plain maximum. maps: (N,H,W)."""
    maps = torch.as_tensor(np.asarray(maps, dtype=np.float32))
    if pool in (1, "max"):
        return maps.flatten(1).amax(dim=1).numpy()
    pooled = F.avg_pool2d(maps[:, None], kernel_size=pool, stride=1)
    return pooled.flatten(1).amax(dim=1).numpy()


def score_images(maps, image_score, pool):
    """--image-score avgpool (max of the pool x pool average-pooled map) or max."""
    return image_scores(maps, pool="max" if image_score == "max" else pool)


def image_auroc(labels, scores):
    """ROC AUC of image scores (sklearn). None if only one class is present."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


# ----------------------------------------------------------------------------------------
# Pixel level
# ----------------------------------------------------------------------------------------


def _as_arrays(maps, masks):
    maps = np.asarray(maps)
    if maps.dtype not in (np.float32, np.float64):
        maps = maps.astype(np.float32)
    masks = np.asarray(masks) > 0
    if maps.shape != masks.shape:
        raise ValueError(f"anomaly maps {maps.shape} and masks {masks.shape} differ in shape")
    if not np.isfinite(maps).all():
        raise ValueError("anomaly maps contain NaN or infinite values")
    return maps, masks


def _counts(sorted_ascending, values):
    """For each value r: (#elements >= r, #elements > r) of an ascending array.
    `values` must be sorted too (either way): numpy's binary search is ten times faster
    on sorted keys (it starts each search where the previous one ended)."""
    descending = len(values) > 1 and values[0] > values[-1]
    keys = values[::-1] if descending else values
    n = len(sorted_ascending)
    at_least = n - np.searchsorted(sorted_ascending, keys, side="left")
    above = n - np.searchsorted(sorted_ascending, keys, side="right")
    return (at_least[::-1], above[::-1]) if descending else (at_least, above)


def _negative_counts(candidates, positives, values):
    """(#defect-free pixels >= r, > r) for each r, from the sorted scores of all pixels
    >= some cut (`candidates`) and of the anomalous ones among them (`positives`): a
    difference of counts, so the defect-free pixels never need to be picked out of the
    big array (boolean indexing of 113 M pixels costs more than the sort)."""
    all_at_least, all_above = _counts(candidates, values)
    pos_at_least, pos_above = _counts(positives, values)
    return all_at_least - pos_at_least, all_above - pos_above


def pixel_auroc(maps, masks):
    """ROC AUC over all pixels (anomalous = mask > 0). None without both kinds of pixel.

    Equal to sklearn's roc_auc_score on the flattened arrays: the area under the ROC
    curve with tied scores merged is the Mann-Whitney statistic with ties counted 1/2.
    """
    maps, masks = _as_arrays(maps, masks)
    positives = np.sort(maps[masks])
    n_pos, n_neg = positives.size, masks.size - positives.size
    if n_pos == 0 or n_neg == 0:
        return None
    at_least, above = _negative_counts(np.sort(maps, axis=None), positives, positives)
    # each positive beats the negatives below it and ties with the equal ones
    twice_wins = (2 * (n_neg - at_least) + (at_least - above)).sum(dtype=np.int64)
    return float(twice_wins / (2.0 * n_pos * n_neg))


def defect_regions(masks):
    """Label the 8-connected regions of each mask (scipy.ndimage.label, as MVTec does).
    Returns (region id of every anomalous pixel, in the order of maps[masks], ids 1..n
    unique over the whole set; n)."""
    ids, count = [], 0
    for i in range(len(masks)):
        if masks[i].any():
            lab, n = ndi.label(masks[i], structure=EIGHT_CONNECTED)
            ids.append(lab[masks[i]] + count)
            count += n
    return (np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)), count


def pro_curve(maps, masks, fpr_limit=0.3):
    """The per-region-overlap curve of MVTec AD, up to the first point beyond fpr_limit.

    MVTec's definition (compute_pro in their evaluation code): sort all pixels by score,
    descending; each defect-free pixel raises the FPR by 1/(number of defect-free pixels
    of the whole set), each pixel of a region raises the PRO by 1/(region size)/(number
    of regions of the whole set); of a run of equal scores only the last point is kept.

    Between two consecutive scores taken by anomalous pixels, only defect-free pixels
    enter, so the curve runs horizontally; a horizontal run is fixed by its end points.
    For each distinct anomalous-pixel score r the curve therefore needs only two points:
    (#defect-free > r, PRO before r) and (#defect-free >= r, PRO after r). And only
    the top fpr_limit share of the defect-free pixels matters: a cheap cut finds them.

    Returns (fpr, pro) float64 arrays starting at (0, 0), or None without regions.
    """
    maps, masks = _as_arrays(maps, masks)
    region_of_pixel, n_regions = defect_regions(masks)
    n_ok = masks.size - region_of_pixel.size
    if n_regions == 0 or n_ok == 0:
        return None
    region_size = np.bincount(region_of_pixel, minlength=n_regions + 1)
    region_scores = maps[masks]
    region_weight = 1.0 / region_size[region_of_pixel]  # each region weighs 1 in total

    # Only the top floor(limit * n_ok) + 1 defect-free pixels can matter (the last one is
    # the first point past the limit). Cut a little below the quantile estimated on a
    # sample, check that enough defect-free pixels pass, lower the cut if not.
    needed = min(n_ok, int(np.floor(fpr_limit * n_ok)) + 1)
    stride = max(1, maps.size // 1_000_000)
    sample = maps.ravel()[::stride][~masks.ravel()[::stride]]
    share = needed / n_ok if sample.size else 1.0
    while True:
        share = min(1.0, share + 0.01)
        cut = np.quantile(sample, 1.0 - share) if share < 1.0 else -np.inf
        in_region = region_scores >= cut
        candidates = maps[maps >= cut]
        n_ok_above_cut = candidates.size - int(in_region.sum())
        if n_ok_above_cut >= needed:
            break
    candidates = np.sort(candidates)
    scores, weights = region_scores[in_region], region_weight[in_region]
    order = np.argsort(-scores)  # only the anomalous pixels: few; order within ties is irrelevant
    scores, weights = scores[order], weights[order]
    last_of_run = np.append(scores[1:] != scores[:-1], True)[: scores.size]
    pro_after = np.cumsum(weights)[last_of_run] / n_regions
    pro_before = np.concatenate([[0.0], pro_after])[:-1]
    distinct = scores[last_of_run]
    at_least, above = _negative_counts(candidates, scores[::-1], distinct)

    fpr = np.empty(2 * len(distinct) + 2)
    pro = np.empty_like(fpr)
    fpr[0], pro[0] = 0.0, 0.0
    fpr[1:-1:2], pro[1:-1:2] = above / n_ok, pro_before
    fpr[2:-1:2], pro[2:-1:2] = at_least / n_ok, pro_after
    # after the lowest anomalous score above the cut, the curve runs horizontally to the
    # lowest defect-free score above the cut, which lies past fpr_limit (the cut says so)
    fpr[-1] = n_ok_above_cut / n_ok
    pro[-1] = pro_after[-1] if len(distinct) else 0.0
    if share >= 1.0:  # everything was included: MVTec's curve ends at (1, 1)
        fpr, pro = np.append(fpr, 1.0), np.append(pro, 1.0)
    return np.minimum(fpr, 1.0), np.minimum(pro, 1.0)


def trapezoid(x, y, x_max):
    """Area under the polyline (x, y) from x[0] to x_max, interpolating y linearly at
    x_max (MVTec's generic_util.trapezoid)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    correction = 0.0
    if x_max not in x:
        ins = int(np.searchsorted(x, x_max, side="right"))  # bisect_right: x is non-decreasing
        if not 0 < ins < len(x):
            raise ValueError(f"the curve does not reach fpr {x_max}")
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (
            x[ins] - x[ins - 1]
        )
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    inside = x <= x_max
    x, y = x[inside], y[inside]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def au_pro(maps, masks, fpr_limit=0.3):
    """Normalised area under the PRO curve up to fpr_limit (MVTec AD): in [0, 1].
    maps: (N,H,W) scores, masks: (N,H,W) ground truth (> 0 anomalous). None without regions."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    curve = pro_curve(maps, masks, fpr_limit)
    if curve is None:
        return None
    fpr, pro = curve
    return trapezoid(fpr, pro, fpr_limit) / fpr_limit


def f1_optimal_threshold(maps, masks):
    """The pixel threshold t maximising F1 of (map >= t) against the masks, and that F1.

    Chosen on whatever data is passed; evaluate.py passes the test set and uses it FOR
    PICTURES ONLY (it says so in the picture and the JSON). The best threshold is always
    one of the anomalous pixels' scores: lowering t past a defect-free-only score only
    adds false positives. Returns (None, None) without anomalous pixels.
    """
    maps, masks = _as_arrays(maps, masks)
    positives = np.sort(maps[masks])
    if positives.size == 0:
        return None, None
    descending = positives[::-1]
    last_of_run = np.append(descending[1:] != descending[:-1], True)
    thresholds = descending[last_of_run]
    true_pos = np.flatnonzero(last_of_run) + 1
    candidates = np.sort(maps[maps >= thresholds[-1]])
    false_pos, _ = _negative_counts(candidates, positives, thresholds)
    f1 = 2 * true_pos / (2 * true_pos + false_pos + (positives.size - true_pos))
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def mean_over_categories(results):
    """Each metric's mean over the categories (None when a category lacks it)."""
    summary = {}
    for name in ("image_auroc", "pixel_auroc", "au_pro"):
        values = [r[name] for r in results.values()]
        summary[name] = (
            float(np.mean(values)) if values and all(v is not None for v in values) else None
        )
    return summary


# ----------------------------------------------------------------------------------------
# A test split's report (evaluate.py's metrics.json)
# ----------------------------------------------------------------------------------------


def compute_metrics(maps, masks, labels, has_masks, scores, fpr_limit):
    """Image AUROC, pixel AUROC, AU-PRO of one set of images, with a sentence for each
    metric that cannot be computed (and why)."""
    result, missing = {}, {}
    result["image_auroc"] = image_auroc(labels, scores)
    if result["image_auroc"] is None:
        kind = "anomalous" if not labels.any() else "good"
        missing["image_auroc"] = (
            f"needs good and anomalous images; this split has no {kind} images"
        )
    if not labels.any():
        why = (
            "pixel metrics need anomalous test images with ground-truth masks; this split has none"
        )
        missing["pixel_auroc"] = missing["au_pro"] = why
        result["pixel_auroc"] = result["au_pro"] = None
    elif not has_masks.all():
        why = (
            f"pixel metrics need masks: {int((~has_masks).sum())} anomalous test images have "
            "no ground-truth mask"
        )
        missing["pixel_auroc"] = missing["au_pro"] = why
        result["pixel_auroc"] = result["au_pro"] = None
    else:
        result["pixel_auroc"] = pixel_auroc(maps, masks)
        result["au_pro"] = au_pro(maps, masks, fpr_limit)
        if result["au_pro"] is None:
            missing["au_pro"] = (
                "the masks of the anomalous images are empty: AU-PRO needs defect regions"
            )
        if result["pixel_auroc"] is None:
            missing["pixel_auroc"] = "needs anomalous and defect-free pixels"
    return result, missing


def defect_rows(labels, defects):
    """Per defect type, the test images its metrics are computed on: its own and every good one."""
    return {defect: (defects == defect) | ~labels for defect in sorted(set(defects[labels]))}


def per_defect_metrics(samples, maps, masks, scores, fpr_limit):
    """compute_metrics of each defect type of the test `samples` (data.Sample: label,
    defect, mask) on defect_rows, with its number of images."""
    labels = np.array([s.label for s in samples], dtype=bool)
    defects = np.array([s.defect for s in samples])
    per_defect = {}
    for defect, rows in defect_rows(labels, defects).items():
        has_masks = np.array(
            [s.mask is not None for s in samples if s.label == 1 and s.defect == defect]
        )
        numbers, why = compute_metrics(
            maps[rows], masks[rows], labels[rows], has_masks, scores[rows], fpr_limit
        )
        per_defect[defect] = {**numbers, "images": int((defects == defect).sum())}
        if why:
            per_defect[defect]["not_computed"] = why
    return per_defect


def protocol(image_score, pool, fpr_limit, input_size, anomaly_map):
    """How every number in metrics.json was computed, in words."""
    return {
        "anomaly_map": f"{anomaly_map}: {ANOMALY_MAPS[anomaly_map]}",
        "image_score": f"max of the {pool}x{pool} average-pooled map (stride 1, no padding)"
        if image_score == "avgpool"
        else "max of the map",
        "resolution": f"{input_size}x{input_size} (the input size; masks resized with nearest)",
        "au_pro": f"MVTec AD definition, exact, FPR limit {fpr_limit}",
        "auroc_flipped": False,
        "image_labels": "from the test folders (good vs a defect type)",
        "per_defect": "each defect type's images together with all good images",
    }
