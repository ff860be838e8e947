"""How long AU-PRO takes at the size of MVTec AD's test set (1,725 maps of 256 x 256).

    python3 benchmarks/bench_aupro.py   # ours, MVTec's code, 20 of the authors' 1000 steps
    python3 benchmarks/bench_aupro.py --authors-steps 1000   # the authors' whole loop (long)

Three implementations on the same synthetic maps (smooth noise, blob-shaped defects on
1,258 of the 1,725 images, as in MVTec AD):
  ours      realnet.metrics.au_pro: value sort of the top 30 % + searchsorted (exact)
  mvtec     MVTec AD's compute_pro + trapezoid (exact; an argsort of all 113 M pixels),
            transcribed in tests/test_metrics.py
  authors   the RealNet/UniAD loop (docs/method.md, section 7): 1000 thresholds,
            each relabelling every mask and measuring every region (with scipy instead of
            skimage); timed over --authors-steps thresholds and extrapolated to 1000.
Also times pixel AUROC (ours vs sklearn's roc_auc_score) on the same pixels.
"""

import argparse
import os
import sys
import time

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from realnet import metrics  # noqa: E402
from test_metrics import mvtec_au_pro  # noqa: E402

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument("--images", type=int, default=1725, help="MVTec AD's test set size")
parser.add_argument("--anomalous", type=int, default=1258, help="MVTec AD's defective test images")
parser.add_argument("--size", type=int, default=256, help="the evaluation resolution")
parser.add_argument(
    "--authors-steps",
    type=int,
    default=20,
    help="thresholds of the authors' loop to time (1000 = all)",
)
parser.add_argument("--skip-mvtec", action="store_true", help="skip MVTec's argsort version")
parser.add_argument("--skip-sklearn", action="store_true", help="skip sklearn's pixel AUROC")
parser.add_argument("--seed", type=int, default=0)


def make_maps(n, n_anomalous, size, seed):
    """Smooth noise maps in [0, 1] that are higher on blob-shaped defects."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n_anomalous):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.integers(2, size // 8, 2)
            masks[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
    noise = torch.from_numpy(rng.standard_normal((n, 1, size // 8, size // 8)).astype(np.float32))
    smooth = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)[
        :, 0
    ].numpy()
    maps = 1 / (1 + np.exp(-(smooth + 2.5 * masks - 1.5)))
    return maps.astype(np.float32), masks


def authors_pro_loop(preds, masks, steps):
    """RealNet's utils/eval_helper.py EvalPixelPro.eval_ (inherited from UniAD), with
    scipy standing in for skimage.measure.label/regionprops. Returns their PRO value when
    steps == 1000, else None."""
    max_step, expect_fpr = 1000, 0.3
    max_th, min_th = preds.max(), preds.min()
    delta = (max_th - min_th) / max_step
    pros_mean, fprs = [], []
    binary_score_maps = np.zeros_like(preds, dtype=bool)
    masks = masks > 0
    for step in range(steps):
        thred = max_th - step * delta
        binary_score_maps[preds <= thred] = 0
        binary_score_maps[preds > thred] = 1
        pro = []
        for i in range(len(binary_score_maps)):
            label_map, _ = ndi.label(masks[i], structure=np.ones((3, 3)))
            for k, box in enumerate(ndi.find_objects(label_map), start=1):
                region = label_map[box] == k
                filled = ndi.binary_fill_holes(region)  # prop.filled_image
                intersection = (
                    np.logical_and(binary_score_maps[i][box], filled).astype(np.float32).sum()
                )
                pro.append(intersection / region.sum())  # / prop.area
        pros_mean.append(np.array(pro).mean())
        masks_neg = ~masks
        fprs.append(np.logical_and(masks_neg, binary_score_maps).sum() / masks_neg.sum())
    if steps < max_step:
        return None
    fprs, pros_mean = np.array(fprs), np.array(pros_mean)
    idx = fprs <= expect_fpr
    selected = fprs[idx]
    selected = (selected - selected.min()) / (
        selected.max() - selected.min()
    )  # min-max, not / 0.3
    from sklearn.metrics import auc

    return auc(selected, pros_mean[idx])


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main():
    args = parser.parse_args()
    maps, masks = make_maps(args.images, args.anomalous, args.size, args.seed)
    print(
        f"{args.images} maps of {args.size}x{args.size} ({maps.size / 1e6:.0f} M pixels), "
        f"{args.anomalous} with defects; torch threads {torch.get_num_threads()}, "
        f"cpus {os.cpu_count()}"
    )

    ours, t_ours = timed(lambda: metrics.au_pro(maps, masks))
    print(f"ours     AU-PRO {ours:.8f}  {t_ours:7.2f} s")
    if not args.skip_mvtec:
        ref, t_ref = timed(lambda: mvtec_au_pro(maps, masks))
        print(
            f"mvtec    AU-PRO {ref:.8f}  {t_ref:7.2f} s   |ours - mvtec| = {abs(ours - ref):.2e}"
        )
    value, t_auth = timed(lambda: authors_pro_loop(maps, masks, args.authors_steps))
    total = t_auth * 1000 / args.authors_steps
    shown = f"{value:.8f}" if value is not None else "(not all steps)"
    print(
        f"authors  PRO    {shown}  {total:7.1f} s for 1000 thresholds"
        + (
            ""
            if args.authors_steps == 1000
            else f" (extrapolated from {args.authors_steps}: {t_auth:.1f} s)"
        )
    )

    auroc, t_auroc = timed(lambda: metrics.pixel_auroc(maps, masks))
    print(f"ours     pixel AUROC {auroc:.8f}  {t_auroc:7.2f} s")
    if not args.skip_sklearn:
        from sklearn.metrics import roc_auc_score

        ref, t_sk = timed(lambda: roc_auc_score(masks.ravel() > 0, maps.ravel()))
        print(
            f"sklearn  pixel AUROC {ref:.8f}  {t_sk:7.2f} s   "
            f"|ours - sklearn| = {abs(auroc - ref):.2e}"
        )
    (thr, f1), t_f1 = timed(lambda: metrics.f1_optimal_threshold(maps, masks))
    print(f"ours     F1-optimal threshold {thr:.6f} (F1 {f1:.4f})  {t_f1:7.2f} s")


if __name__ == "__main__":
    main()
