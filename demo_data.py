"""The embedded default data set: a small MVTec-layout data set drawn procedurally.

Not part of the method (the realnet package never imports it): a stand-in for MVTec AD
that needs no download, so that every stage can be run and tested offline.

    python3 -m demo_data --out data/demo --dtd-out data/demo_dtd

writes, in a few seconds and identically for the same seed,

    data/demo/<category>/train/good/000.png ...                       normal training images
    data/demo/<category>/test/good/000.png ...                        normal test images
    data/demo/<category>/test/<defect>/000.png ...                    defective test images
    data/demo/<category>/ground_truth/<defect>/000_mask.png ...       their pixel masks
    data/demo_dtd/images/<texture>/<texture>_000.png ...              DTD-style textures

Categories: two objects on a dark table (washer, tablet) and two textures (granite,
weave). Normal images vary as real ones do (position, rotation, colour, texture noise);
the defects are real structures - scratches, cracks, chips/holes, stains, bent or bulged
outlines, cut or foreign threads - not the Perlin-shaped blends used for training, so a
model that scores well here has learnt "not normal", not "looks like my synthetic data".
Defects cover a few % of the image and are clearly visible at 128 x 128.

Every image has its own generator default_rng([seed, crc32(category), split, defect, i]),
so a category, or one image, is the same whatever else is generated. A finished category
is recorded in <out>/demo.json; asking again for the same settings returns at once.
"""

import argparse
import json
import math
import os
import time
import zlib

import numpy as np
from PIL import Image
from scipy import ndimage

from realnet.cli import UserError, run
from realnet.files import atomic_write_json, prepare_output_folder
from realnet.runs import differences

DEMO_VERSION = 1
DEMO_CATEGORIES = ["granite", "tablet", "washer", "weave"]  # sorted: the class-id order
DEMO_OBJECTS = ["tablet", "washer"]
DEMO_TEXTURES = ["granite", "weave"]
DEFAULT_CATEGORY = "washer"
DEFECTS = {
    "granite": ["crack", "hole", "scratch", "stain"],
    "tablet": ["bulge", "chip", "crack", "spot"],
    "washer": ["bent", "chip", "rust", "scratch"],
    "weave": ["cut", "hole", "stain", "thread"],
}
DTD_TEXTURES = ["banded", "checkered", "dotted", "marbled", "zigzag"]


# ----------------------------------------------------------------------------------------
# Drawing helpers: float32 images in [0, 255], coordinates in pixels
# ----------------------------------------------------------------------------------------


def _smooth_noise(rng, size, cells):
    """A smooth random field (unit std) with about `cells` bumps per side."""
    coarse = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    field = np.asarray(
        Image.fromarray(coarse, "F").resize((size + 3 * size // cells,) * 2, Image.BICUBIC)
    )
    o = size // cells
    field = field[o : o + size, o : o + size]
    return (field - field.mean()) / (field.std() + 1e-6)


def _noise(rng, std, size):
    """Per-pixel grey noise, (size, size, 1) float32."""
    return rng.standard_normal((size, size, 1), dtype=np.float32) * std


def _grid(size):
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    return yy + 0.5, xx + 0.5


def _soft(distance):
    """Coverage of a pixel by a shape from its signed distance to the edge (> 0 inside)."""
    return np.clip(distance + 0.5, 0.0, 1.0)


def _box(shape, y0, y1, x0, x1):
    """The slice of an image covering [y0, y1] x [x0, x1] (clipped), or None if outside."""
    h, w = shape
    ys, xs = (
        slice(max(0, int(y0)), min(h, int(math.ceil(y1)) + 1)),
        slice(max(0, int(x0)), min(w, int(math.ceil(x1)) + 1)),
    )
    return (ys, xs) if ys.start < ys.stop and xs.start < xs.stop else None


def _segment_distance(yy, xx, points):
    """Distance of every pixel to a polyline."""
    d = np.full(yy.shape, np.inf, np.float32)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        vy, vx = y1 - y0, x1 - x0
        t = np.clip(((yy - y0) * vy + (xx - x0) * vx) / max(vy * vy + vx * vx, 1e-6), 0, 1)
        d = np.minimum(d, np.hypot(yy - (y0 + t * vy), xx - (x0 + t * vx)))
    return d


def _line_alpha(yy, xx, points, width):
    """Coverage of a polyline of the given width (each segment in its bounding box only)."""
    alpha = np.zeros(yy.shape, np.float32)
    for p, q in zip(points[:-1], points[1:]):
        box = _box(
            yy.shape,
            min(p[0], q[0]) - width,
            max(p[0], q[0]) + width,
            min(p[1], q[1]) - width,
            max(p[1], q[1]) + width,
        )
        if box:
            alpha[box] = np.maximum(
                alpha[box], _soft(width / 2 - _segment_distance(yy[box], xx[box], [p, q]))
            )
    return alpha


def _blob_alpha(yy, xx, cy, cx, radius, rng, roughness=0.3):
    """An irregular blob: a circle whose radius varies with angle by a few random harmonics."""
    harmonics = [
        (k, roughness / k * rng.uniform(0.5, 1.0), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 5)
    ]
    alpha = np.zeros(yy.shape, np.float32)
    reach = radius * (1 + roughness) + 2
    box = _box(yy.shape, cy - reach, cy + reach, cx - reach, cx + reach)
    if box:
        y, x = yy[box], xx[box]
        theta = np.arctan2(y - cy, x - cx)
        r = 1 + sum(amp * np.cos(k * theta + phase) for k, amp, phase in harmonics)
        alpha[box] = _soft(radius * r - np.hypot(y - cy, x - cx))
    return alpha


def _random_walk(rng, start, angle, steps, step, wiggle):
    points = [start]
    for _ in range(steps):
        angle += rng.normal(0, wiggle)
        y, x = points[-1]
        points.append((y + step * math.sin(angle), x + step * math.cos(angle)))
    return points


def _composite(image, colour, alpha):
    """Paint `colour` (an RGB triple or an image) over `image` with coverage `alpha`."""
    a = alpha[..., None]
    return image * (1 - a) + np.asarray(colour, np.float32) * a


def _table(rng, size, base):
    """A dark, slightly uneven table under the objects."""
    tone = np.asarray(base, np.float32) * rng.uniform(0.95, 1.05)
    return tone + 5.0 * _smooth_noise(rng, size, 4)[..., None] + _noise(rng, 1.5, size)


def _finish(image):
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------
# Objects. Each renderer takes the defect name (None for a normal image) and returns
# (uint8 image, bool mask or None). Geometry is analytic, so masks are exact.
# ----------------------------------------------------------------------------------------


def _bump(theta, centre, width):
    d = np.angle(np.exp(1j * (theta - centre)))  # wrapped angular difference
    return np.exp(-((d / width) ** 2))


def render_washer(rng, size, defect=None):
    s = size / 256.0
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.uniform(-5, 5, 2) * s
    outer, inner = rng.uniform(85, 88) * s, rng.uniform(37, 39) * s
    tab_angle = rng.uniform(-0.08, 0.08) - math.pi / 2  # a locating tab on top
    dy, dx = yy - cy, xx - cx
    rho, theta = np.hypot(dy, dx), np.arctan2(dy, dx)
    tab = 9 * s * (np.abs(np.angle(np.exp(1j * (theta - tab_angle)))) < 0.13)

    angle = rng.uniform(0, 2 * math.pi)
    mid = (outer + inner) / 2
    bump = 0.0
    if defect == "bent":  # the plate bent outwards: the outline bulges, the hole follows
        bump = rng.uniform(14, 18) * s * _bump(theta, angle, rng.uniform(0.3, 0.4))

    def silhouette(bump):
        return _soft(outer + tab + bump - rho) * _soft(rho - inner - bump * 0.6)

    ring = silhouette(bump)
    base = rng.uniform(178, 188)
    light = rng.uniform(-0.15, 0.15) - math.pi / 4  # the station's lamp hardly moves
    brushed = np.interp(
        rho,
        np.arange(size, dtype=np.float32),
        ndimage.gaussian_filter1d(rng.normal(0, 5, size), 0.8),
    )  # turned rings
    edge = np.minimum(outer + tab + bump - rho, rho - inner - bump * 0.6)
    metal = (base * (1 + 0.12 * np.cos(2 * (theta - light))) + brushed) * (
        0.78 + 0.22 * np.clip(edge / (4 * s), 0, 1)
    )
    metal = metal[..., None] * np.array([1.0, 1.0, 1.04], np.float32) + _noise(rng, 2.0, size)
    background = _table(rng, size, (44, 47, 54))
    shadow = np.roll(ring, (int(4 * s), int(4 * s)), axis=(0, 1))
    background *= (1 - 0.35 * shadow)[..., None]

    mask = None
    if defect == "bent":
        mask = np.abs(ring - silhouette(0.0)) > 0.3
    if defect == "chip":  # a piece broken out of the rim: the table shows through
        r, at = rng.uniform(17, 23) * s, outer - 4 * s
        bite = _blob_alpha(
            yy, xx, cy + at * math.sin(angle), cx + at * math.cos(angle), r, rng, 0.25
        )
        mask = (bite > 0.3) & (ring > 0.3)
        ring = ring * (1 - bite)
    image = _composite(background, metal, ring)
    if defect == "scratch":
        length, direction = (
            rng.uniform(55, 85) * s,
            angle + rng.uniform(0.6, 1.2) * rng.choice([-1, 1]),
        )
        py, px = cy + mid * math.sin(angle), cx + mid * math.cos(angle)
        half = (length / 2 * math.sin(direction), length / 2 * math.cos(direction))
        line = _line_alpha(
            yy,
            xx,
            [(py - half[0], px - half[1]), (py + half[0], px + half[1])],
            rng.uniform(3, 4.5) * s,
        ) * (ring > 0.5)
        image = _composite(
            image, (60, 60, 62) if rng.random() < 0.5 else (255, 255, 250), line * 0.9
        )
        mask = line > 0.3
    if defect == "rust":
        r = rng.uniform(12, 18) * s
        spot = _blob_alpha(
            yy, xx, cy + mid * math.sin(angle), cx + mid * math.cos(angle), r, rng, 0.4
        )
        spot *= ring > 0.5
        rust = (
            np.array([150, 72, 28], np.float32)
            * (1 + 0.15 * _smooth_noise(rng, size, 24))[..., None]
        )
        image = _composite(image, rust, spot * 0.9)
        mask = spot > 0.3
    return _finish(image), mask


def render_tablet(rng, size, defect=None):
    s = size / 256.0
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.uniform(-5, 5, 2) * s
    a, b = rng.uniform(75, 79) * s, rng.uniform(45, 47) * s
    phi = rng.uniform(-0.1, 0.1)
    u = (xx - cx) * math.cos(phi) + (yy - cy) * math.sin(phi)
    v = -(xx - cx) * math.sin(phi) + (yy - cy) * math.cos(phi)
    q = np.hypot(u / a, v / b)  # 1 on the outline
    theta = np.arctan2(v / b, u / a)
    pill = _soft((1 - q) * b)
    colour = np.array([234, 229, 214], np.float32) * rng.uniform(0.97, 1.02)
    shade = (1 - 0.16 * q**2) * (1 + 0.02 * _smooth_noise(rng, size, 12))
    score = 1 - 0.22 * _soft(1.4 * s - np.abs(u)) * (np.abs(v) < 0.75 * b)  # the break line
    body = colour * (shade * score)[..., None] + _noise(rng, 2.5, size)
    background = _table(rng, size, (34, 66, 72))
    background *= (1 - 0.4 * np.roll(pill, (int(4 * s), int(3 * s)), axis=(0, 1)))[..., None]

    mask = None
    angle = rng.uniform(-math.pi, math.pi)
    ey, ex = (
        cy + (a * math.cos(angle)) * math.sin(phi) + (b * math.sin(angle)) * math.cos(phi),
        cx + (a * math.cos(angle)) * math.cos(phi) - (b * math.sin(angle)) * math.sin(phi),
    )
    if defect == "bulge":  # a misshapen tablet: the outline swells out on one side
        swollen = _soft(
            (1 - q / (1 + rng.uniform(0.16, 0.22) * _bump(theta, angle, rng.uniform(0.35, 0.5))))
            * b
        )
        mask = np.abs(swollen - pill) > 0.3
        pill = swollen
    if defect == "chip":
        bite = _blob_alpha(yy, xx, ey, ex, rng.uniform(15, 21) * s, rng, 0.25)
        mask = (bite > 0.3) & (pill > 0.3)
        pill = pill * (1 - bite)
    image = _composite(background, body, pill)
    inside = pill > 0.5
    if defect == "crack":  # from the rim inwards, jagged
        start = (cy + 0.9 * (ey - cy), cx + 0.9 * (ex - cx))
        towards = math.atan2(cy - start[0], cx - start[1]) + rng.uniform(-0.4, 0.4)
        points = _random_walk(rng, start, towards, int(rng.integers(14, 20)), 4.5 * s, 0.35)
        crack = _line_alpha(yy, xx, points, rng.uniform(2.5, 3.5) * s) * inside
        image = _composite(image, (70, 64, 58), crack * 0.95)
        mask = crack > 0.3
    if defect == "spot":  # contamination: a dark or coloured speck
        r = rng.uniform(10, 15) * s
        t = rng.uniform(0.15, 0.6)
        py, px = cy + t * (ey - cy), cx + t * (ex - cx)
        spot = _blob_alpha(yy, xx, py, px, r, rng, 0.35) * inside
        tint = [(110, 55, 35), (55, 60, 140), (45, 45, 45), (150, 120, 40)][int(rng.integers(4))]
        image = _composite(image, tint, spot * 0.9)
        mask = spot > 0.3
    return _finish(image), mask


# ----------------------------------------------------------------------------------------
# Textures
# ----------------------------------------------------------------------------------------


def render_granite(rng, size, defect=None):
    s = size / 256.0
    yy, xx = _grid(size)
    tone = np.array([142, 136, 128], np.float32) + rng.uniform(-4, 4, 3)
    variation = (
        0.5 * _smooth_noise(rng, size, 6)
        + 0.35 * _smooth_noise(rng, size, 20)
        + 0.25 * _smooth_noise(rng, size, max(8, int(60 * s)))
    )
    grains = np.zeros((size, size), np.float32)
    n = int(1800 * s * s)
    grains[rng.integers(0, size, n), rng.integers(0, size, n)] = rng.choice([-1.0, 1.0, 1.6], n)
    grains = ndimage.gaussian_filter(grains, 0.8 * s) * 9
    image = tone * (1 + 0.07 * variation + 0.5 * grains)[..., None]

    mask = None
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    if defect == "crack":
        points = _random_walk(
            rng, (cy, cx), rng.uniform(0, 2 * math.pi), int(rng.integers(22, 30)), 4.5 * s, 0.3
        )
        crack = _line_alpha(yy, xx, points, rng.uniform(3.5, 4.5) * s)
        image = _composite(image, (30, 27, 25), crack)
        mask = crack > 0.3
    if defect == "hole":  # a pit: dark inside, a bright lip on one side
        r = rng.uniform(9, 14) * s
        pit = _blob_alpha(yy, xx, cy, cx, r, rng, 0.2)
        lip = _blob_alpha(yy, xx, cy + 2 * s, cx + 2 * s, r + 2.5 * s, rng, 0.2) * (1 - pit)
        image = _composite(_composite(image, (215, 210, 200), lip * 0.8), (25, 22, 20), pit)
        mask = (pit + lip) > 0.3
    if defect == "scratch":
        angle, length = rng.uniform(0, math.pi), rng.uniform(70, 110) * s
        half = (length / 2 * math.sin(angle), length / 2 * math.cos(angle))
        line = _line_alpha(
            yy,
            xx,
            [(cy - half[0], cx - half[1]), (cy + half[0], cx + half[1])],
            rng.uniform(4, 5.5) * s,
        )
        image = _composite(image, (250, 248, 240), line * 0.95)
        mask = line > 0.3
    if defect == "stain":
        spot = _blob_alpha(yy, xx, cy, cx, rng.uniform(16, 24) * s, rng, 0.4)
        tint = np.array(
            [[0.55, 0.38, 0.22], [0.45, 0.55, 0.85], [0.35, 0.35, 0.3]][int(rng.integers(3))],
            np.float32,
        )
        image = _composite(image, image * tint, spot * rng.uniform(0.8, 0.95))
        mask = spot > 0.3
    return _finish(image), mask


def _weave_pattern(yy, xx, period, phase, rotation):
    u = (xx * math.cos(rotation) + yy * math.sin(rotation)) / period + phase[0]
    v = (-xx * math.sin(rotation) + yy * math.cos(rotation)) / period + phase[1]
    warp, weft = np.sin(math.pi * (u % 1)) ** 0.7, np.sin(math.pi * (v % 1)) ** 0.7
    warp_on_top = (np.floor(u) + np.floor(v)) % 2 == 0
    return np.where(warp_on_top, warp * (0.7 + 0.3 * weft), weft * (0.7 + 0.3 * warp)), warp_on_top


def render_weave(rng, size, defect=None):
    s = size / 256.0
    yy, xx = _grid(size)
    period, rotation = rng.uniform(11, 13) * s, rng.uniform(-0.04, 0.04)
    phase = rng.uniform(0, 2, 2)
    pattern, warp_on_top = _weave_pattern(yy, xx, period, phase, rotation)
    warp_colour = np.array([196, 170, 120], np.float32) * rng.uniform(0.96, 1.04)
    weft_colour = warp_colour * np.array([0.92, 0.95, 1.05], np.float32)
    fibres = 1 + 0.06 * _smooth_noise(rng, size, max(8, int(80 * s)))
    colour = np.where(warp_on_top[..., None], warp_colour, weft_colour)
    image = colour * (0.25 + 0.75 * pattern * fibres)[..., None]

    mask = None
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    if defect == "cut":  # broken threads along a cut: the weave frays and shifts
        angle, length, width = (
            rng.uniform(0, math.pi),
            rng.uniform(50, 75) * s,
            rng.uniform(7, 10) * s,
        )
        half = (length / 2 * math.sin(angle), length / 2 * math.cos(angle))
        cut = _line_alpha(
            yy, xx, [(cy - half[0], cx - half[1]), (cy + half[0], cx + half[1])], width
        )
        frayed, _ = _weave_pattern(yy, xx, period * 0.6, phase + 0.5, rotation + 0.8)
        image = _composite(image, warp_colour * (0.1 + 0.3 * frayed)[..., None], cut)
        mask = cut > 0.3
    if defect == "hole":
        hole = _blob_alpha(yy, xx, cy, cx, rng.uniform(10, 15) * s, rng, 0.35)
        image = _composite(image, (28, 26, 30), hole)
        mask = hole > 0.3
    if defect == "stain":
        spot = _blob_alpha(yy, xx, cy, cx, rng.uniform(16, 24) * s, rng, 0.45)
        image = _composite(
            image, image * np.array([0.35, 0.25, 0.18], np.float32), spot * rng.uniform(0.8, 0.95)
        )
        mask = spot > 0.3
    if defect == "thread":  # a foreign fibre lying on the cloth
        angle = rng.uniform(0, 2 * math.pi)
        points = _random_walk(rng, (cy, cx), angle, int(rng.integers(14, 20)), 5 * s, 0.15)
        fibre = _line_alpha(yy, xx, points, rng.uniform(2.5, 3.5) * s)
        image = _composite(
            image, [(40, 40, 120), (140, 30, 30), (30, 30, 30)][int(rng.integers(3))], fibre
        )
        mask = fibre > 0.3
    return _finish(image), mask


RENDERERS = {
    "granite": render_granite,
    "tablet": render_tablet,
    "washer": render_washer,
    "weave": render_weave,
}


def render(category, rng, size, defect=None):
    """One demo image (uint8 (S,S,3)) and, for a defect, its bool mask (S,S)."""
    image, mask = RENDERERS[category](rng, size, defect)
    if defect is not None and not mask.any():
        raise AssertionError(
            f"demo defect {category}/{defect} came out empty"
        )  # a bug, not user input
    return image, mask


def _rng(seed, category, split, defect, i):
    return np.random.default_rng(
        [seed, zlib.crc32(category.encode()), split, zlib.crc32(defect.encode()), i]
    )


# ----------------------------------------------------------------------------------------
# Writing the tree
# ----------------------------------------------------------------------------------------


def _save_png(array, path):
    Image.fromarray(array).save(path, format="PNG", optimize=False, compress_level=1)


def _load_manifest(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _jobs(category, n_train, n_test_good, n_test_defect):
    """(split, defect, i) of every image of a category, in writing order."""
    jobs = [("train", "good", i) for i in range(n_train)]
    jobs += [("test", "good", i) for i in range(n_test_good)]
    defects = DEFECTS[category]
    jobs += [("test", defects[i % len(defects)], i // len(defects)) for i in range(n_test_defect)]
    return jobs


def _written_files(category, settings):
    """The files (relative to the category folder) that `settings` made: all the generator
    may delete when the category is remade with other settings."""
    files = set()
    for split, defect, i in _jobs(
        category, settings["n_train"], settings["n_test_good"], settings["n_test_defect"]
    ):
        files.add(os.path.join(split, defect, f"{i:03d}.png"))
        if defect != "good":
            files.add(os.path.join("ground_truth", defect, f"{i:03d}_mask.png"))
    return files


def _remove_ours(folder, ours):
    """Delete the files in `ours` and the folders left empty; refuse (before deleting
    anything) when the folder holds a file the generator did not write."""
    found = {
        os.path.relpath(os.path.join(parent, name), folder)
        for parent, _, names in os.walk(folder)
        for name in names
    }
    foreign = sorted(found - ours)
    if foreign:
        raise UserError(
            f"{os.path.join(folder, foreign[0])!r} was not written by the demo "
            f"generator ({len(foreign)} such file(s)); it would be lost when "
            f"{folder!r} is remade with other settings: choose another --out or "
            "move it away"
        )
    for name in found:
        os.unlink(os.path.join(folder, name))
    for parent, _, _ in sorted(os.walk(folder), key=lambda entry: -len(entry[0])):
        os.rmdir(parent)  # deepest first: all empty now


def make_demo_dataset(
    root,
    seed=0,
    categories=None,
    image_size=256,
    n_train=40,
    n_test_good=10,
    n_test_defect=20,
    verbose=False,
):
    """Write the demo data set (MVTec layout) under root; same settings -> byte-identical
    files. Categories already written with the same settings are kept; one written with
    other settings is remade (a file the generator did not write there is never deleted:
    refused). Returns root.

    n_test_defect defective test images per category are spread over its defect types."""
    categories = list(DEMO_CATEGORIES if categories is None else categories)
    unknown = [c for c in categories if c not in RENDERERS]
    if unknown:
        raise UserError(
            f"unknown demo category {unknown[0]!r} (the demo has {', '.join(DEMO_CATEGORIES)})"
        )
    if image_size < 32:
        raise UserError(f"--size: demo image size must be at least 32, got {image_size}")
    counts = {"--train": n_train, "--test-good": n_test_good, "--test-defect": n_test_defect}
    for name, count in counts.items():
        if count < 1:  # a category without train/ (or without a test split) is no data set
            raise UserError(f"{name} must be >= 1 (got {count})")
    manifest_path = os.path.join(root, "demo.json")
    manifest = _load_manifest(manifest_path) or {
        "generator": "demo_data.py",
        "version": DEMO_VERSION,
        "categories": {},
    }
    for category in categories:
        settings = {
            "version": DEMO_VERSION,
            "seed": seed,
            "image_size": image_size,
            "n_train": n_train,
            "n_test_good": n_test_good,
            "n_test_defect": n_test_defect,
        }
        folder = os.path.join(root, category)
        previous = manifest["categories"].get(category)
        if previous == settings and os.path.isdir(folder):
            continue
        if os.path.exists(folder):
            if previous is None and os.listdir(folder):
                raise UserError(
                    f"{folder!r} exists and was not written by the demo generator; "
                    "choose another --out"
                )
            if previous is not None:
                _remove_ours(folder, _written_files(category, previous))
                changed = "; ".join(differences(previous, settings))
                print(f"{folder}: remade ({changed})")
        start = time.time()
        for split, defect, i in _jobs(category, n_train, n_test_good, n_test_defect):
            image_dir = os.path.join(folder, split, defect)
            os.makedirs(image_dir, exist_ok=True)
            rng = _rng(seed, category, 0 if split == "train" else 1, defect, i)
            image, mask = render(category, rng, image_size, None if defect == "good" else defect)
            _save_png(image, os.path.join(image_dir, f"{i:03d}.png"))
            if mask is not None:
                mask_dir = os.path.join(folder, "ground_truth", defect)
                os.makedirs(mask_dir, exist_ok=True)
                _save_png(
                    (mask * 255).astype(np.uint8), os.path.join(mask_dir, f"{i:03d}_mask.png")
                )
        manifest["categories"][category] = settings
        atomic_write_json(manifest_path, manifest)
        if verbose:
            print(
                f"{folder}: {n_train} train, {n_test_good} good + {n_test_defect} defective test "
                f"images ({', '.join(DEFECTS[category])}), {image_size}x{image_size}, "
                f"{time.time() - start:.1f} s"
            )
    return root


# ----------------------------------------------------------------------------------------
# DTD-style textures (an anomaly source for training when no SDAS images exist yet)
# ----------------------------------------------------------------------------------------


def render_texture(kind, rng, height, width):
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    c1, c2 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    angle, freq = rng.uniform(0, math.pi), rng.uniform(0.05, 0.2)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    if kind == "banded":
        t = 0.5 + 0.5 * np.sin(u * freq * 2)
    elif kind == "checkered":
        t = ((np.floor(u * freq) + np.floor(v * freq)) % 2).astype(np.float32)
    elif kind == "dotted":
        t = (np.hypot((u * freq) % 1 - 0.5, (v * freq) % 1 - 0.5) < 0.3).astype(np.float32)
    elif kind == "marbled":
        warp = 8 * _smooth_noise(rng, max(height, width), 5)[:height, :width]
        t = 0.5 + 0.5 * np.sin(u * freq * 0.6 + warp)
    elif kind == "zigzag":
        t = ((np.abs((u * freq) % 2 - 1) + v * freq * 0.5) % 1 < 0.5).astype(np.float32)
    else:
        raise ValueError(kind)
    noise = rng.standard_normal((height, width, 1), dtype=np.float32) * 6
    return _finish(c1 * (1 - t[..., None]) + c2 * t[..., None] + noise)


def make_demo_textures(root, seed=0, n=4, verbose=False):
    """DTD-style folder: root/images/<texture>/<texture>_NNN.png, n images per texture of
    varied, non-square sizes (DTD images are squashed to the input size). Returns root."""
    manifest_path = os.path.join(root, "demo_textures.json")
    settings = {"version": DEMO_VERSION, "seed": seed, "n": n, "textures": DTD_TEXTURES}
    if _load_manifest(manifest_path) == settings:
        return root
    count = 0
    for kind in DTD_TEXTURES:
        folder = os.path.join(root, "images", kind)
        os.makedirs(folder, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, zlib.crc32(kind.encode()), i])
            height, width = (int(x) for x in rng.integers(160, 289, 2))
            _save_png(
                render_texture(kind, rng, height, width),
                os.path.join(folder, f"{kind}_{i:03d}.png"),
            )
            count += 1
    atomic_write_json(manifest_path, settings)
    if verbose:
        print(
            f"{os.path.join(root, 'images')}: {count} textures "
            f"({', '.join(DTD_TEXTURES)}), {n} each"
        )
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write the embedded demo data set (MVTec layout) and DTD-style textures."
    )
    parser.add_argument("--out", default="data/demo", help="data set root (default data/demo)")
    parser.add_argument(
        "--dtd-out",
        default="data/demo_dtd",
        help="texture folder; '' to skip (default data/demo_dtd)",
    )
    parser.add_argument(
        "--categories", default=",".join(DEMO_CATEGORIES), help="comma-separated (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--size", type=int, default=256, help="image side in pixels (default 256, the input size)"
    )
    parser.add_argument(
        "--train", type=int, default=40, help="normal training images per category (default 40)"
    )
    parser.add_argument(
        "--test-good", type=int, default=10, help="normal test images per category (default 10)"
    )
    parser.add_argument(
        "--test-defect",
        type=int,
        default=20,
        help="defective test images per category (default 20)",
    )
    parser.add_argument(
        "--textures", type=int, default=4, help="images per DTD-style texture (default 4)"
    )
    args = parser.parse_args(argv)
    if args.dtd_out and args.textures < 1:
        raise UserError(f"--textures must be >= 1 (got {args.textures})")
    prepare_output_folder(args.out)
    if args.dtd_out:
        prepare_output_folder(args.dtd_out, "--dtd-out")
    start = time.time()
    make_demo_dataset(
        args.out,
        args.seed,
        [c for c in args.categories.split(",") if c],
        args.size,
        args.train,
        args.test_good,
        args.test_defect,
        verbose=True,
    )
    if args.dtd_out:
        make_demo_textures(args.dtd_out, args.seed, args.textures, verbose=True)
    print(
        f"done in {time.time() - start:.1f} s "
        "(categories already written with these settings are kept)"
    )


if __name__ == "__main__":
    run(main)
