"""An unseen category for the OK/NG calibration check: wood, drawn procedurally.

Used for nothing but one check (benchmarks/demo_accuracy.py --unseen): does the OK/NG
threshold that training stores hold on a category that no setting of this project was ever
chosen on? It is not one of demo_data.py's categories and no flag, rule or map was chosen by
looking at it. MVTec layout, the demo's counts (40 train, 10 good + 20 defective test images):

    python3 benchmarks/unseen_category.py --out data/unseen      # -> data/unseen/wood/...

Normal images: planks of wood grain (growth rings bent by a smooth field, fine fibres, a
plank seam), varying in tone, ring spacing, direction and position. Defects, each a real
structure and not a pasted blend: a crack along the grain, a knot hole, a discoloured patch
and a glue drop (a shiny, slightly raised spot).
"""

import argparse
import math
import os
import sys
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from demo_data import (
    _blob_alpha,
    _composite,
    _finish,
    _grid,
    _line_alpha,  # noqa: E402
    _random_walk,
    _save_png,
    _smooth_noise,
)
from realnet.cli import UserError, run  # noqa: E402
from realnet.files import prepare_output_folder  # noqa: E402

CATEGORY = "wood"
DEFECTS = ["crack", "knot_hole", "discolour", "glue"]


def render_wood(rng, size, defect=None):
    """(uint8 image (S, S, 3), bool mask or None) of one plank."""
    s = size / 256.0
    yy, xx = _grid(size)
    angle = rng.uniform(-0.15, 0.15) + (math.pi / 2 if rng.random() < 0.5 else 0)
    u = xx * math.cos(angle) + yy * math.sin(angle)  # across the grain
    bend = 9 * s * _smooth_noise(rng, size, 3) + 2.5 * s * _smooth_noise(rng, size, 9)
    period = rng.uniform(13, 18) * s
    rings = 0.5 + 0.5 * np.sin(2 * math.pi * (u + bend) / period)
    rings = rings**1.8  # thin dark late-wood lines
    fibres = _smooth_noise(rng, size, max(16, int(90 * s)))
    tone = np.array([176, 128, 82], np.float32) * rng.uniform(0.9, 1.08)
    light = 1 + 0.05 * _smooth_noise(rng, size, 2)
    image = tone * (light * (0.92 - 0.28 * rings + 0.03 * fibres))[..., None]
    seam = abs(((u / size) + rng.uniform(0, 1)) % 1 - 0.5) * size  # a plank joint
    image = _composite(image, image * 0.55, np.clip(1.5 * s - seam, 0, 1))

    mask = None
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    if defect == "crack":  # a split along the grain, dark and a little open
        points = _random_walk(
            rng,
            (cy, cx),
            angle + math.pi / 2 + rng.uniform(-0.2, 0.2),
            int(rng.integers(14, 22)),
            4.5 * s,
            0.12,
        )
        crack = _line_alpha(yy, xx, points, rng.uniform(3.5, 4.5) * s)
        image = _composite(image, (38, 24, 16), crack)
        mask = crack > 0.3
    if defect == "knot_hole":  # a dark hole ringed by a darker, denser knot
        r = rng.uniform(8, 12) * s
        knot = _blob_alpha(yy, xx, cy, cx, r * 1.8, rng, 0.15)
        hole = _blob_alpha(yy, xx, cy, cx, r, rng, 0.25)
        image = _composite(_composite(image, image * 0.6, knot * 0.8), (22, 15, 10), hole)
        mask = (knot + hole) > 0.3
    if defect == "discolour":  # a grey-blue weathered patch
        patch = _blob_alpha(yy, xx, cy, cx, rng.uniform(16, 24) * s, rng, 0.5)
        image = _composite(
            image,
            image.mean(-1, keepdims=True) * np.array([0.8, 0.85, 0.95]),
            patch * rng.uniform(0.75, 0.9),
        )
        mask = patch > 0.3
    if defect == "glue":  # a shiny drop: lighter, smooth, with a highlight
        drop = _blob_alpha(yy, xx, cy, cx, rng.uniform(9, 14) * s, rng, 0.3)
        shine = _blob_alpha(yy, xx, cy - 3 * s, cx - 3 * s, 3 * s, rng, 0.1)
        image = _composite(
            _composite(image, (214, 196, 150), drop * 0.85), (250, 245, 230), shine * drop
        )
        mask = drop > 0.3
    if defect is not None and not mask.any():
        raise AssertionError(f"wood defect {defect} came out empty")  # a bug, not user input
    return _finish(image), mask


def make_unseen_category(root, seed=0, size=256, n_train=40, n_test_good=10, n_test_defect=20):
    """Write <root>/wood in the MVTec layout (same seed: the same files). Returns the folder."""
    folder = os.path.join(root, CATEGORY)
    jobs = [("train", "good", i) for i in range(n_train)]
    jobs += [("test", "good", i) for i in range(n_test_good)]
    jobs += [("test", DEFECTS[i % len(DEFECTS)], i // len(DEFECTS)) for i in range(n_test_defect)]
    for split, defect, i in jobs:
        rng = np.random.default_rng(
            [seed, zlib.crc32(split.encode()), zlib.crc32(defect.encode()), i]
        )
        image, mask = render_wood(rng, size, None if defect == "good" else defect)
        os.makedirs(os.path.join(folder, split, defect), exist_ok=True)
        _save_png(image, os.path.join(folder, split, defect, f"{i:03d}.png"))
        if mask is not None:
            os.makedirs(os.path.join(folder, "ground_truth", defect), exist_ok=True)
            _save_png(
                (mask * 255).astype(np.uint8),
                os.path.join(folder, "ground_truth", defect, f"{i:03d}_mask.png"),
            )
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw the unseen 'wood' category (MVTec layout).")
    p.add_argument("--out", default="data/unseen", help="data set root (the category is wood)")
    p.add_argument("--seed", type=int, default=0, help="the drawing's seed")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    args = p.parse_args(argv)
    if args.size < 64:
        raise UserError(f"--size must be at least 64, got {args.size}")
    prepare_output_folder(args.out)
    folder = make_unseen_category(args.out, args.seed, args.size)
    print(f"{folder}: 40 train, 10 good + 20 defective test images ({', '.join(DEFECTS)})")


if __name__ == "__main__":
    run(main)
