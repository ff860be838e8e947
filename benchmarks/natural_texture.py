"""A natural, high-frequency texture category: pebbles, drawn procedurally (issue 28).

Built to diagnose and check RealNet at demo scale on the kind of texture where it failed to
learn its own synthetic anomalies (stones, grass, sand, bark: high-frequency, irregular,
mostly grey). Not one of demo_data.py's categories. MVTec layout, the demo's counts (40
train, 10 good + 20 defective test images):

    python3 benchmarks/natural_texture.py --out data/natural      # -> data/natural/pebbles/...

Normal images: a bed of small grey pebbles (jittered Voronoi cells, each stone its own tone,
shading towards its rim and a fine speckle), dark sand in the gaps, varying in stone size,
tone and lighting. Defects, each a real structure and not a pasted blend (training pastes
Perlin-shaped SDAS/DTD regions): a crack across the stones, a hole (a missing stone, dark with
a shadowed rim), a patch of moss (green, fine-grained) and a twig lying on the stones.

Protocol: the held-out *training* images (train_realnet.py --val-fraction) may be used to
choose settings; the test split may not (it checks, it does not choose).
"""

import argparse
import math
import os
import sys
import zlib

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from demo_data import (
    _blob_alpha,
    _composite,
    _finish,
    _grid,
    _line_alpha,  # noqa: E402
    _noise,
    _random_walk,
    _save_png,
    _smooth_noise,
)
from realnet.cli import UserError, run  # noqa: E402
from realnet.files import prepare_output_folder  # noqa: E402

CATEGORIES = ["pebbles", "sand"]
DEFECTS = ["crack", "hole", "moss", "twig"]


def _pebble_bed(rng, size):
    """(float32 image (S, S, 3), distance-to-gap (S, S)) of a bed of pebbles."""
    s = size / 256.0
    cell = rng.uniform(9, 13) * s  # stone spacing: ~10 px at 128 px
    n = int(math.ceil(size / cell)) + 2
    gy, gx = np.mgrid[-1 : n - 1, -1 : n - 1].astype(np.float32)
    seeds = np.stack(
        [
            (gy + rng.uniform(0.1, 0.9, gy.shape)) * cell,
            (gx + rng.uniform(0.1, 0.9, gx.shape)) * cell,
        ],
        -1,
    ).reshape(-1, 2)
    yy, xx = _grid(size)
    points = np.stack([yy.ravel(), xx.ravel()], -1)
    dist, owner = cKDTree(seeds).query(points, k=2)
    d1, d2 = dist[:, 0].reshape(size, size), dist[:, 1].reshape(size, size)
    owner = owner[:, 0].reshape(size, size)
    edge = (d2 - d1) / 2  # distance to the cell border
    gap = rng.uniform(0.8, 1.4) * s
    inside = np.clip((edge - gap) / (1.2 * s), 0, 1)  # 0 in the gaps, 1 inside a stone
    radius = np.maximum(edge + d1, 1e-3)
    dome = np.sqrt(np.clip(1 - (d1 / radius) ** 2, 0, 1))  # rounded stone: darker at the rim
    stone_tone = rng.normal(1.0, 0.16, len(seeds)).astype(np.float32)[owner]
    warm = rng.uniform(-0.04, 0.04, (len(seeds), 3)).astype(np.float32)[owner]
    base = np.array([150, 147, 142], np.float32) * rng.uniform(0.85, 1.1)
    speckle = _noise(rng, 0.06, size)[..., 0] + 0.05 * _smooth_noise(
        rng, size, max(8, int(70 * s))
    )
    stones = base * ((stone_tone * (0.72 + 0.3 * dome) + speckle)[..., None] * (1 + warm))
    sand = (
        np.array([70, 64, 56], np.float32)
        * rng.uniform(0.85, 1.15)
        * (1 + 0.15 * _noise(rng, 1.0, size))
    )
    light = 1 + 0.06 * _smooth_noise(rng, size, 2)
    image = (sand * (1 - inside[..., None]) + stones * inside[..., None]) * light[..., None]
    return image, edge


def _sand(rng, size):
    """float32 image (S, S, 3) of grey sand: grains of one to two pixels over several octaves
    of tone, faint ripples; nothing in it repeats."""
    s = size / 256.0
    grains = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 0.7 * s)
    grains /= grains.std() + 1e-6
    coarse = rng.standard_normal((size, size)).astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, 3 * s)
    coarse /= coarse.std() + 1e-6
    yy, xx = _grid(size)
    angle, period = rng.uniform(0, math.pi), rng.uniform(20, 32) * s
    ripples = np.sin(
        2
        * math.pi
        * (xx * math.cos(angle) + yy * math.sin(angle) + 4 * s * _smooth_noise(rng, size, 3))
        / period
    )
    tone = rng.uniform(118, 150)
    grey = tone * (
        1 + 0.22 * grains + 0.1 * coarse + 0.05 * ripples + 0.06 * _smooth_noise(rng, size, 4)
    )
    return np.repeat(grey[..., None], 3, -1) * np.array([1.0, 0.98, 0.95], np.float32)


def render(category, rng, size, defect=None):
    """(uint8 image (S, S, 3), bool mask or None) of one patch of pebbles or sand."""
    s = size / 256.0
    yy, xx = _grid(size)
    image = _pebble_bed(rng, size)[0] if category == "pebbles" else _sand(rng, size)
    mask = None
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    if defect == "crack":  # a dark split running across several stones
        points = _random_walk(
            rng, (cy, cx), rng.uniform(0, 2 * math.pi), int(rng.integers(14, 20)), 4.5 * s, 0.3
        )
        crack = _line_alpha(yy, xx, points, rng.uniform(3.5, 4.5) * s)
        image = _composite(image, (28, 26, 24), crack)
        mask = crack > 0.3
    if defect == "hole":  # a missing stone: a dark pit, its far rim lit
        r = rng.uniform(10, 15) * s
        pit = _blob_alpha(yy, xx, cy, cx, r, rng, 0.2)
        rim = _blob_alpha(yy, xx, cy - 2 * s, cx - 2 * s, r + 2.5 * s, rng, 0.2) * (1 - pit)
        image = _composite(_composite(image, image * 1.35, rim * 0.7), (20, 18, 16), pit)
        mask = (pit + rim) > 0.3
    if defect == "moss":  # a green, fine-grained growth over the stones
        patch = _blob_alpha(yy, xx, cy, cx, rng.uniform(14, 20) * s, rng, 0.5)
        grain = 1 + 0.25 * _noise(rng, 1.0, size)
        moss = np.array([70, 105, 45], np.float32) * rng.uniform(0.85, 1.15) * grain
        image = _composite(image, moss, patch * rng.uniform(0.8, 0.95))
        mask = patch > 0.3
    if defect == "twig":  # a brown twig lying across the stones, with a thin shadow
        angle, length = rng.uniform(0, math.pi), rng.uniform(55, 90) * s
        dy, dx = length / 2 * math.sin(angle), length / 2 * math.cos(angle)
        ends = [(cy - dy, cx - dx), (cy + dy, cx + dx)]
        width = rng.uniform(4.5, 6) * s
        shadow = _line_alpha(yy + 2 * s, xx - 2 * s, ends, width)
        twig = _line_alpha(yy, xx, ends, width)
        bark = (
            np.array([105, 72, 45], np.float32)
            * (1 + 0.1 * _smooth_noise(rng, size, 40))[..., None]
        )
        image = _composite(_composite(image, image * 0.55, shadow * 0.8), bark, twig)
        mask = (twig + 0.5 * shadow) > 0.3
    if defect is not None and not mask.any():
        raise AssertionError(f"{category} defect {defect} came out empty")  # a bug, not user input
    return _finish(image), mask


def make_natural_category(
    root, category="pebbles", seed=0, size=256, n_train=40, n_test_good=10, n_test_defect=20
):
    """Write <root>/<category> in the MVTec layout (same seed: the same files).
    Returns the folder."""
    folder = os.path.join(root, category)
    jobs = [("train", "good", i) for i in range(n_train)]
    jobs += [("test", "good", i) for i in range(n_test_good)]
    jobs += [("test", DEFECTS[i % len(DEFECTS)], i // len(DEFECTS)) for i in range(n_test_defect)]
    for split, defect, i in jobs:
        rng = np.random.default_rng(
            [
                seed,
                zlib.crc32(category.encode()),
                zlib.crc32(split.encode()),
                zlib.crc32(defect.encode()),
                i,
            ]
        )
        image, mask = render(category, rng, size, None if defect == "good" else defect)
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
    p = argparse.ArgumentParser(description="Draw natural-texture categories (MVTec layout).")
    p.add_argument("--out", default="data/natural", help="data set root")
    p.add_argument(
        "--categories",
        nargs="+",
        default=CATEGORIES,
        choices=CATEGORIES,
        help="which textures to draw",
    )
    p.add_argument("--seed", type=int, default=0, help="the drawing's seed")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    args = p.parse_args(argv)
    if args.size < 64:
        raise UserError(f"--size must be at least 64, got {args.size}")
    prepare_output_folder(args.out)
    for category in args.categories:
        folder = make_natural_category(args.out, category, args.seed, args.size)
        print(f"{folder}: 40 train, 10 good + 20 defective test images ({', '.join(DEFECTS)})")


if __name__ == "__main__":
    run(main)
