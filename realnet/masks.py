"""Where a synthetic anomaly goes: Perlin masks times a foreground mask (paper eq. 3's M).

    M = Perlin mask x foreground mask

The Perlin mask is DRAEM's noise (random scale 2^k per axis, k in {0..5}, rotated by up
to 90 degrees, thresholded at 0.5). The foreground mask keeps anomalies on the object: a
global Otsu or Triangle threshold plus morphology, per category, with the rules of the
authors' code (docs/method.md, "Synthetic anomalies"). The thresholds are OpenCV's,
re-implemented exactly in numpy so that no OpenCV is needed.
"""

import math

import numpy as np
from scipy import ndimage

from .cli import UserError

# ----------------------------------------------------------------------------------------
# Perlin masks: where the anomaly goes
# ----------------------------------------------------------------------------------------

PERLIN_SCALE_EXPONENTS = (0, 6)  # 2^k per axis, k in {0..5}: blobs from 1/1 to 1/32 of the image
PERLIN_THRESHOLD = 0.5  # the authors' constructor default


def _fade(t):
    return 6 * t**5 - 15 * t**4 + 10 * t**3  # quintic: zero 1st and 2nd derivative at 0, 1


def rand_perlin_2d(shape, res, rng):
    """Perlin noise of `shape` with `res` lattice cells per axis, in about [-1, 1].

    DRAEM's rand_perlin_2d_np (random unit gradients at the lattice corners, quintic fade,
    x sqrt(2)), written per pixel so that any shape works (theirs needs shape % res == 0;
    where it works, the two agree: see tests)."""
    h, w = shape
    angles = 2 * math.pi * rng.random((res[0] + 1, res[1] + 1))
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)
    y = np.arange(h) * (res[0] / h)  # lattice coordinates of the pixel rows / columns
    x = np.arange(w) * (res[1] / w)
    iy, ix = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]

    def corner(dy, dx):  # dot(gradient at corner, offset from corner)
        g = gradients[iy + dy][:, ix + dx]
        return (fy - dy) * g[..., 0] + (fx - dx) * g[..., 1]

    ty, tx = _fade(fy), _fade(fx)
    n0 = corner(0, 0) + ty * (corner(1, 0) - corner(0, 0))
    n1 = corner(0, 1) + ty * (corner(1, 1) - corner(0, 1))
    return math.sqrt(2) * (n0 + tx * (n1 - n0))


def perlin_mask(size, rng, scale_exponents=PERLIN_SCALE_EXPONENTS, threshold=PERLIN_THRESHOLD):
    """(size, size) float32 {0,1}: thresholded Perlin noise of random scale 2^k per axis,
    rotated by U(-90, 90) degrees (bilinear, zero outside). May be empty (about 5 %)."""
    scale = [2 ** int(rng.integers(*scale_exponents)) for _ in range(2)]
    noise = rand_perlin_2d((size, size), scale, rng)
    angle = rng.uniform(-90.0, 90.0)
    noise = ndimage.rotate(noise, angle, reshape=False, order=1, mode="constant", cval=0.0)
    return (noise > threshold).astype(np.float32)


# ----------------------------------------------------------------------------------------
# Foreground masks: keep anomalies on the object (docs/method.md)
# ----------------------------------------------------------------------------------------


def rgb_to_gray(image):
    """OpenCV's RGB2GRAY in its fixed-point form: (4899 R + 9617 G + 1868 B + 2^13) >> 14."""
    x = image.astype(np.int32)
    return ((x[..., 0] * 4899 + x[..., 1] * 9617 + x[..., 2] * 1868 + (1 << 13)) >> 14).astype(
        np.uint8
    )


def otsu_threshold(channel):
    """OpenCV's Otsu threshold of a uint8 image: the t maximising the between-class
    variance of {<= t} and {> t} (first maximum)."""
    hist = np.bincount(channel.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    q1 = np.cumsum(p)
    q2 = 1.0 - q1
    i = np.arange(256)
    mu = (i * p).sum()
    cum_mu = np.cumsum(i * p)
    eps = np.finfo(np.float32).eps
    valid = (np.minimum(q1, q2) >= eps) & (np.maximum(q1, q2) <= 1.0 - eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu1 = cum_mu / q1
        mu2 = (mu - q1 * mu1) / q2
        sigma = np.where(valid, q1 * q2 * (mu1 - mu2) ** 2, 0.0)
    if not valid.any() or sigma.max() <= 0:
        return 0
    return int(np.argmax(sigma))


def triangle_threshold(channel):
    """OpenCV's triangle threshold (getThreshVal_Triangle_8u), line for line."""
    hist = np.bincount(channel.ravel(), minlength=256).astype(np.int64)
    nonzero = np.flatnonzero(hist)
    if len(nonzero) == 0:
        return 0
    left, right = int(nonzero[0]), int(nonzero[-1])
    left = left - 1 if left > 0 else left
    right = right + 1 if right < 255 else right
    peak = int(np.argmax(hist))
    flipped = False
    if peak - left < right - peak:  # the long tail must be on the left: mirror the histogram
        flipped = True
        hist = hist[::-1]
        left, peak = 255 - right, 255 - peak
    threshold, a, b, best = left, int(hist[peak]), left - peak, 0
    for i in range(left + 1, peak + 1):
        d = a * i + b * int(hist[i])
        if d > best:
            best, threshold = d, i
    threshold -= 1
    return 255 - threshold if flipped else threshold


def _square(mask, op, k):
    """Grey closing/opening of a {0,1} mask with a k x k square (skimage's footprint)."""
    if k <= 1:
        return mask
    fn = ndimage.grey_closing if op == "close" else ndimage.grey_opening
    return fn(mask, size=(k, k))


# (channel, method, foreground, closing k, opening k) with k in 256-px units; None = all ones.
# channel: "gray", 1 (G) or 2 (B) of the RGB image; foreground: the bright or the dark side.
_ALL = None
FOREGROUND_RULES = {
    "mvtec": {
        **{c: _ALL for c in ("carpet", "leather", "tile", "wood", "cable", "transistor")},
        "pill": ("gray", "otsu", "bright", 6, 6),
        **{
            c: ("gray", "triangle", "bright", 6, 6)
            for c in ("hazelnut", "metal_nut", "toothbrush")
        },
        **{
            c: ("gray", "otsu", "dark", 6, 6)
            for c in ("bottle", "capsule", "grid", "screw", "zipper")
        },
    },
    "visa": {
        "capsules": _ALL,
        **{c: (2, "triangle", "bright", 8, 3) for c in ("pcb1", "pcb2", "pcb3", "pcb4")},
        **{
            c: ("gray", "otsu", "bright", 3, 3)
            for c in (
                "candle",
                "cashew",
                "chewinggum",
                "fryum",
                "macaroni1",
                "macaroni2",
                "pipe_fryum",
            )
        },
    },
    "mpdd": {
        **{c: (1, "otsu", "dark", 6, 0) for c in ("bracket_black", "bracket_brown", "connector")},
        **{c: (2, "otsu", "bright", 6, 0) for c in ("bracket_white", "tubes")},
        "metal_plate": ("gray", "otsu", "dark", 6, 0),
    },
    "btad": {
        "02": _ALL,
        **{c: ("gray", "otsu", "bright", 15, 6) for c in ("01", "03")},
    },
    # the embedded demo data set (demo_data.py): bright objects on a dark table, textures
    "demo": {
        "granite": _ALL,
        "weave": _ALL,
        "tablet": ("gray", "otsu", "bright", 6, 6),
        "washer": ("gray", "otsu", "bright", 6, 6),
    },
}
FOREGROUND_MODES = ("category", "auto", "none")


def _scaled(k, size):
    """Footprints are given in 256-px units (the authors' masks are made at 256 x 256)."""
    return max(1, int(round(k * size / 256))) if k else 0


def threshold_foreground(image, channel, method, foreground, closing, opening):
    x = rgb_to_gray(image) if channel == "gray" else image[..., channel]
    t = otsu_threshold(x) if method == "otsu" else triangle_threshold(x)
    mask = (x > t).astype(np.uint8)
    if foreground == "dark":
        mask = 1 - mask
    size = image.shape[0]
    mask = _square(mask, "close", _scaled(closing, size))
    mask = _square(mask, "open", _scaled(opening, size))
    return mask.astype(np.float32)


def auto_foreground(image):
    """The foreground of an unknown category: Otsu on gray; the side that owns at least 80 %
    of the image border is the background, the other side is the object (closing and
    opening with 6-px squares). If neither side owns the border (a texture, or an object
    that fills the frame), or the object would be under 1 % of the image: everything."""
    gray = rgb_to_gray(image)
    bright = gray > otsu_threshold(gray)
    border = np.concatenate([bright[0], bright[-1], bright[:, 0], bright[:, -1]])
    if border.mean() <= 0.2:
        side = "bright"
    elif border.mean() >= 0.8:
        side = "dark"
    else:
        return np.ones(gray.shape, np.float32)
    mask = threshold_foreground(image, "gray", "otsu", side, 6, 6)
    return mask if mask.mean() >= 0.01 else np.ones(gray.shape, np.float32)


def foreground_rule(category, dataset_format):
    """The known rule for this category, or "auto" when there is none."""
    family = {"visa_csv": "visa"}.get(dataset_format, dataset_format)
    for table in (FOREGROUND_RULES.get(family, {}), FOREGROUND_RULES["demo"]):
        if category in table:
            return table[category]
    return "auto"


def foreground_mask(image_uint8, category, dataset_format, mode="category"):
    """(S, S) float32 {0,1}: where anomalies may go. mode "category" uses the authors' rule
    for a known category (docs/method.md) and `auto_foreground` for any other; "auto" always
    uses `auto_foreground`; "none" allows the whole image."""
    if mode not in FOREGROUND_MODES:
        raise UserError(
            f"unknown foreground mode {mode!r} (expected {', '.join(FOREGROUND_MODES)})"
        )
    shape = image_uint8.shape[:2]
    if mode == "none":
        return np.ones(shape, np.float32)
    rule = foreground_rule(category, dataset_format) if mode == "category" else "auto"
    if rule == "auto":
        return auto_foreground(image_uint8)
    if rule is _ALL:
        return np.ones(shape, np.float32)
    return threshold_foreground(image_uint8, *rule)
