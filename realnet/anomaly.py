"""Synthetic anomalies for training (SPEC §3, paper eq. 3): where, what, how strongly.

    mask     M = Perlin mask x foreground mask        (redrawn until it is not empty)
    image    A = (1 - M) I + M (delta P + (1 - delta) I)

P, the anomaly's appearance, is an SDAS image (made by synthesize.py, delta ~ U(0.5, 1)) or
a DTD texture with three random colour/geometry augmentations (delta ~ U(0.2, 1)), or,
when both folders are given, either one with probability 1/2.

Everything random takes a `np.random.Generator`, so a sample is a pure function of its
seed: `AnomalyStream` gives sample g the generator `default_rng([seed, g])`, which makes
the training data independent of the number of ranks and workers and of resuming.

Two deliberate differences from the authors' code (facts §2.2, §10.9): an empty mask is
redrawn (they keep it: about 5 % of their "anomalies" are unchanged normal images labelled
as anomalies), and the blend is rounded to the nearest grey level (they truncate).
"""
import math
import os

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from scipy import ndimage

from . import data
from .cli import UserError

# ----------------------------------------------------------------------------------------
# Perlin masks: where the anomaly goes
# ----------------------------------------------------------------------------------------

PERLIN_SCALE_EXPONENTS = (0, 6)   # 2^k per axis, k in {0..5}: blobs from 1/1 to 1/32 of the image
PERLIN_THRESHOLD = 0.5            # the authors' constructor default
MAX_MASK_TRIES = 16               # redraws before the fallback blob (rarely reached)


def _fade(t):
    return 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3   # quintic: zero 1st and 2nd derivative at 0, 1


def rand_perlin_2d(shape, res, rng):
    """Perlin noise of `shape` with `res` lattice cells per axis, in about [-1, 1].

    DRAEM's rand_perlin_2d_np (random unit gradients at the lattice corners, quintic fade,
    x sqrt(2)), written per pixel so that any shape works (theirs needs shape % res == 0;
    where it works, the two agree: see tests)."""
    h, w = shape
    angles = 2 * math.pi * rng.random((res[0] + 1, res[1] + 1))
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)
    y = np.arange(h) * (res[0] / h)   # lattice coordinates of the pixel rows / columns
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
# Foreground masks: keep anomalies on the object (facts §2.2)
# ----------------------------------------------------------------------------------------

def rgb_to_gray(image):
    """OpenCV's RGB2GRAY in its fixed-point form: (4899 R + 9617 G + 1868 B + 2^13) >> 14."""
    x = image.astype(np.int32)
    return ((x[..., 0] * 4899 + x[..., 1] * 9617 + x[..., 2] * 1868 + (1 << 13)) >> 14).astype(np.uint8)


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
    if peak - left < right - peak:   # the long tail must be on the left: mirror the histogram
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
        **{c: ("gray", "triangle", "bright", 6, 6) for c in ("hazelnut", "metal_nut", "toothbrush")},
        **{c: ("gray", "otsu", "dark", 6, 6) for c in ("bottle", "capsule", "grid", "screw", "zipper")},
    },
    "visa": {
        "capsules": _ALL,
        **{c: (2, "triangle", "bright", 8, 3) for c in ("pcb1", "pcb2", "pcb3", "pcb4")},
        **{c: ("gray", "otsu", "bright", 3, 3)
           for c in ("candle", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pipe_fryum")},
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
        "granite": _ALL, "weave": _ALL,
        "tablet": ("gray", "otsu", "bright", 6, 6), "washer": ("gray", "otsu", "bright", 6, 6),
    },
}
FOREGROUND_MODES = ("category", "auto", "none")
_warned_auto = set()


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
    for a known category (facts §2.2) and `auto_foreground` for any other; "auto" always
    uses `auto_foreground`; "none" allows the whole image."""
    if mode not in FOREGROUND_MODES:
        raise UserError(f"unknown foreground mode {mode!r} (expected {', '.join(FOREGROUND_MODES)})")
    shape = image_uint8.shape[:2]
    if mode == "none":
        return np.ones(shape, np.float32)
    rule = foreground_rule(category, dataset_format) if mode == "category" else "auto"
    if rule == "auto":
        return auto_foreground(image_uint8)
    if rule is _ALL:
        return np.ones(shape, np.float32)
    return threshold_foreground(image_uint8, *rule)


# ----------------------------------------------------------------------------------------
# Blending: what the anomaly looks like
# ----------------------------------------------------------------------------------------

def blend(image, source, mask, delta):
    """A = (1 - M) I + M (delta P + (1 - delta) I), rounded to uint8 (paper eq. 3)."""
    i = image.astype(np.float64)
    m = np.asarray(mask, np.float64)[..., None]
    out = (1.0 - m) * i + m * (delta * source.astype(np.float64) + (1.0 - delta) * i)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# The ten augmentations of the authors' DTD source (MemSeg's rand_augment, facts §2.3),
# with PIL and numpy instead of imgaug. Each maps (uint8 HxWx3, rng) -> uint8 HxWx3.
def _gamma_contrast(x, rng):          # GammaContrast((0.5, 2.0), per_channel=True)
    gamma = rng.uniform(0.5, 2.0, size=3)
    return (255.0 * (x / 255.0) ** gamma + 0.5).astype(np.uint8)


def _brightness(x, rng):              # MultiplyAndAddToBrightness(mul=(0.8,1.2), add=(-30,30))
    ycbcr = np.asarray(Image.fromarray(x).convert("YCbCr")).astype(np.float32)
    ycbcr[..., 0] = np.clip(ycbcr[..., 0] * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30), 0, 255)
    return np.asarray(Image.fromarray(ycbcr.astype(np.uint8), "YCbCr").convert("RGB"))


def _sharpness(x, rng):               # pillike.EnhanceSharpness(factor (0, 2))
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(x)).enhance(rng.uniform(0.0, 2.0)))


def _hue_saturation(x, rng):          # AddToHueAndSaturation((-50, 50), per_channel=True)
    hsv = np.asarray(Image.fromarray(x).convert("HSV")).astype(np.int32)
    hue, saturation = rng.integers(-50, 51, size=2)
    hsv[..., 0] = (hsv[..., 0] + hue) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + saturation, 0, 255)
    return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))


def _solarize(x, rng):                # Solarize(p=0.5, threshold=(32, 128))
    if rng.random() >= 0.5:
        return x
    return np.where(x >= rng.uniform(32, 128), 255 - x, x).astype(np.uint8)


def _posterize(x, rng):               # Posterize(nb_bits (1, 8))
    return np.asarray(ImageOps.posterize(Image.fromarray(x), int(rng.integers(1, 9))))


def _invert(x, rng):                  # Invert()
    return 255 - x


def _autocontrast(x, rng):            # pillike.Autocontrast(cutoff (0, 20))
    return np.asarray(ImageOps.autocontrast(Image.fromarray(x), cutoff=int(rng.integers(0, 21))))


def _equalize(x, rng):                # pillike.Equalize()
    return np.asarray(ImageOps.equalize(Image.fromarray(x)))


def _rotate(x, rng):                  # Affine(rotate=(-45, 45)), bilinear, black outside
    return np.asarray(Image.fromarray(x).rotate(rng.uniform(-45, 45), Image.BILINEAR, fillcolor=(0, 0, 0)))


DTD_AUGMENTATIONS = (_gamma_contrast, _brightness, _sharpness, _hue_saturation, _solarize,
                     _posterize, _invert, _autocontrast, _equalize, _rotate)


def rand_augment(image, rng, n=3):
    """n distinct augmentations out of the ten, applied in the drawn order."""
    for k in rng.choice(len(DTD_AUGMENTATIONS), size=n, replace=False):
        image = np.ascontiguousarray(DTD_AUGMENTATIONS[k](image, rng), dtype=np.uint8)
    return image


SDAS_DELTA = (0.5, 1.0)   # transparency ranges of the authors' configs
DTD_DELTA = (0.2, 1.0)


def list_dtd_images(dtd_dir):
    """Every image under <dtd>/images/*/ (the DTD archive layout); a folder that is itself
    the images/ folder, or holds the images directly, works too."""
    root = os.path.join(dtd_dir, "images") if os.path.isdir(os.path.join(dtd_dir, "images")) else dtd_dir
    files = data.list_images(root)
    for sub in sorted(os.listdir(root)):
        if os.path.isdir(os.path.join(root, sub)):
            files += data.list_images(os.path.join(root, sub))
    return files


class AnomalySource:
    """Where anomaly appearances come from: an SDAS folder (every image file in it) and/or a
    DTD folder. `draw(rng)` -> (P uint8 (S,S,3), delta, kind, path)."""

    def __init__(self, size, sdas_dir=None, dtd_dir=None):
        if not sdas_dir and not dtd_dir:
            raise UserError("no anomaly source: give an SDAS folder (--sdas, made by synthesize.py) "
                            "and/or a DTD folder (--dtd, with images/<texture>/*.jpg)")
        self.size = size
        self.sdas, self.dtd = [], []
        if sdas_dir:
            if not os.path.isdir(sdas_dir):
                raise UserError(f"--sdas: folder {sdas_dir!r} does not exist")
            self.sdas = data.list_images(sdas_dir)
            if not self.sdas:
                raise UserError(f"--sdas: folder {sdas_dir!r} has no images (expected the PNGs written by synthesize.py)")
        if dtd_dir:
            if not os.path.isdir(dtd_dir):
                raise UserError(f"--dtd: folder {dtd_dir!r} does not exist")
            self.dtd = list_dtd_images(dtd_dir)
            if not self.dtd:
                raise UserError(f"--dtd: folder {dtd_dir!r} has no images (expected images/<texture>/*.jpg)")
        self.sdas_dir, self.dtd_dir = sdas_dir, dtd_dir

    def describe(self):
        return {"sdas_dir": self.sdas_dir and os.path.abspath(self.sdas_dir), "sdas_images": len(self.sdas),
                "dtd_dir": self.dtd_dir and os.path.abspath(self.dtd_dir), "dtd_images": len(self.dtd)}

    def draw(self, rng):
        use_sdas = bool(self.sdas) and (not self.dtd or rng.random() < 0.5)
        if use_sdas:
            path = self.sdas[int(rng.integers(len(self.sdas)))]
            return data.load_image(path, self.size), rng.uniform(*SDAS_DELTA), "sdas", path
        path = self.dtd[int(rng.integers(len(self.dtd)))]
        texture = rand_augment(data.load_image(path, self.size), rng)   # squashed to size, no crop
        return texture, rng.uniform(*DTD_DELTA), "dtd", path


class AnomalySynthesizer:
    """image -> (anomalous image, mask) for one category (SPEC §3)."""

    def __init__(self, category, dataset_format, size, sdas_dir=None, dtd_dir=None, foreground="category"):
        if foreground not in FOREGROUND_MODES:
            raise UserError(f"unknown foreground mode {foreground!r} (expected {', '.join(FOREGROUND_MODES)})")
        self.category, self.dataset_format, self.size, self.foreground = category, dataset_format, size, foreground
        self.source = AnomalySource(size, sdas_dir, dtd_dir)
        rule = foreground_rule(category, dataset_format)
        if foreground == "category" and rule == "auto" and category not in _warned_auto:
            _warned_auto.add(category)
            print(f"note: no foreground rule for category {category!r}; using --foreground auto "
                  "(Otsu, the side that owns the border is background)")

    def describe(self):
        return {"category": self.category, "dataset_format": self.dataset_format, "size": self.size,
                "foreground": self.foreground, **self.source.describe()}

    def draw_mask(self, foreground, rng):
        """Perlin x foreground, redrawn until it is not empty; after MAX_MASK_TRIES misses
        (a tiny foreground) an ellipse centred on a random foreground pixel."""
        if foreground.sum() < 1:   # a threshold that found nothing must not block synthesis
            foreground = np.ones_like(foreground)
        for _ in range(MAX_MASK_TRIES):
            mask = perlin_mask(self.size, rng) * foreground
            if mask.any():
                return mask
        ys, xs = np.nonzero(foreground)
        k = int(rng.integers(len(ys)))
        ry, rx = rng.uniform(self.size / 32, self.size / 8, size=2)
        yy, xx = np.mgrid[:self.size, :self.size]
        ellipse = ((yy - ys[k]) / ry) ** 2 + ((xx - xs[k]) / rx) ** 2 <= 1.0
        return ellipse.astype(np.float32) * foreground

    def synthesize(self, image, rng):
        """dict(anomalous, mask, kind, delta, source): everything a picture of it needs."""
        fg = foreground_mask(image, self.category, self.dataset_format, self.foreground)
        mask = self.draw_mask(fg, rng)
        source, delta, kind, path = self.source.draw(rng)
        return dict(anomalous=blend(image, source, mask, delta), mask=mask, kind=kind, delta=delta,
                    source=path, foreground=fg)

    def __call__(self, image_uint8, rng):
        out = self.synthesize(image_uint8, rng)
        return out["anomalous"], out["mask"]


# ----------------------------------------------------------------------------------------
# The training stream
# ----------------------------------------------------------------------------------------

def is_normal_sample(g, normal_ratio):
    """Sample g is normal iff ceil((g+1) r) - ceil(g r) == 1: for r = 1/2 the even g's, so
    any run of B consecutive g's (one batch) holds exactly B r normal samples for even B."""
    return math.ceil((g + 1) * normal_ratio) - math.ceil(g * normal_ratio) == 1


class AnomalyStream(torch.utils.data.Dataset):
    """Training samples as an endless, deterministic stream indexed by a global sample id g.

    g = step * global_batch + position. Image: epoch = g // n, a seeded permutation per epoch.
    Sample kind: with normal_ratio=0.5 exactly half of every batch is normal (g even ->
    normal, g odd -> synthetic anomaly); normal_ratio=0 -> all anomalous (AFS). The
    synthesis RNG is np.random.default_rng([seed, g]), so a sample does not depend on which
    rank or worker makes it, nor on whether the run was resumed.

    Items: image (anomalous, normalised), clean (the image before synthesis, normalised),
    mask (1,S,S), anomalous (bool), index (position of the image in `samples`), g.
    """

    def __init__(self, samples, size, synthesizer, seed=0, normal_ratio=0.5, cache_images=True):
        if not samples:
            raise UserError("no training images to synthesise anomalies on")
        if not 0.0 <= normal_ratio <= 1.0:
            raise UserError(f"normal_ratio must be in [0, 1], got {normal_ratio}")
        self.samples, self.size, self.synthesizer = list(samples), size, synthesizer
        self.seed, self.normal_ratio = seed, normal_ratio
        self.cache_images = cache_images
        self._images = {}
        self._permutation = (None, None)

    def __len__(self):   # endless; the sampler says which g's to take
        return 2 ** 62

    def image_index(self, g):
        n = len(self.samples)
        epoch, position = divmod(g, n)
        if self._permutation[0] != epoch:
            self._permutation = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
        return int(self._permutation[1][position])

    def clean_image(self, index):
        """The resized uint8 training image (decoded once per worker when cache_images)."""
        if index in self._images:
            return self._images[index]
        image = data.load_image(self.samples[index].image, self.size)
        if self.cache_images:
            self._images[index] = image
        return image

    def raw(self, g):
        """Sample g in uint8, with what made it (kind, delta, source) for pictures."""
        index = self.image_index(g)
        clean = self.clean_image(index)
        if is_normal_sample(g, self.normal_ratio):
            return dict(clean=clean, anomalous=clean, mask=np.zeros(clean.shape[:2], np.float32),
                        is_anomalous=False, index=index, kind="normal", delta=0.0, source=None)
        out = self.synthesizer.synthesize(clean, np.random.default_rng([self.seed, g]))
        return dict(clean=clean, is_anomalous=True, index=index, **out)

    def __getitem__(self, g):
        r = self.raw(int(g))
        return dict(image=data.to_tensor(r["anomalous"]), clean=data.to_tensor(r["clean"]),
                    mask=torch.from_numpy(np.ascontiguousarray(r["mask"], np.float32))[None],
                    anomalous=r["is_anomalous"], index=r["index"], g=int(g))


class StreamSampler(torch.utils.data.Sampler):
    """Yields this rank's g's for steps [start_step, total_steps): rank r of W takes positions
    [r*B/W, (r+1)*B/W) of each global batch of B. Use with DataLoader(batch_size=B//W)."""

    def __init__(self, start_step, total_steps, global_batch, rank=0, world_size=1):
        if global_batch % world_size:
            raise UserError(f"global batch {global_batch} is not divisible by the {world_size} processes")
        self.start_step, self.total_steps, self.global_batch = start_step, total_steps, global_batch
        self.per_rank = global_batch // world_size
        self.offset = rank * self.per_rank

    def __len__(self):
        return max(0, self.total_steps - self.start_step) * self.per_rank

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            base = step * self.global_batch + self.offset
            yield from range(base, base + self.per_rank)


# ----------------------------------------------------------------------------------------
# Looking at it
# ----------------------------------------------------------------------------------------

def dump_examples(stream, n, out_dir, start_g=0):
    """Write the first n synthetic anomalies of the stream (from start_g on) as PNGs:
    example_XX.png (what the model sees), example_XX_mask.png, and contact_sheet.png with
    one row per example: clean | anomalous | mask | anomalous with the mask's contour.
    Returns the paths written."""
    from . import viz
    from .files import atomic_save_image
    os.makedirs(out_dir, exist_ok=True)
    written, rows, g = [], [], start_g
    while len(rows) < n:
        r = stream.raw(g)
        g += 1
        if not r["is_anomalous"]:
            continue
        i = len(rows)
        mask_rgb = viz.mask_to_uint8(r["mask"])
        for suffix, picture in (("", r["anomalous"]), ("_mask", mask_rgb[..., 0])):
            path = os.path.join(out_dir, f"example_{i:02d}{suffix}.png")
            atomic_save_image(Image.fromarray(picture), path)
            written.append(path)
        caption = f"g={g - 1} {r['kind']} d={r['delta']:.2f}"
        rows.append(viz.hstack([viz.labelled(r["clean"], "clean"), viz.labelled(r["anomalous"], caption),
                                viz.labelled(mask_rgb, "mask"),
                                viz.labelled(viz.draw_contour(r["anomalous"], r["mask"] > 0), "contour")]))
    if rows:
        sheet = os.path.join(out_dir, "contact_sheet.png")
        atomic_save_image(viz.to_pil(viz.grid(rows, 1)), sheet)
        written.append(sheet)
    return written
