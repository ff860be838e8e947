"""Synthetic anomalies (paper eq. 3): an image, a mask and an appearance make an anomaly.

    mask     M = Perlin mask x foreground mask        (masks.py; redrawn until not empty)
    image    A = (1 - M) I + M (delta P + (1 - delta) I)

P, the anomaly's appearance, is an SDAS image (made by synthesize.py, delta ~ U(0.5, 1)) or
a DTD texture with three random colour/geometry augmentations (textures.py,
delta ~ U(0.2, 1)), or, when both folders are given, either one with probability 1/2.

Everything random takes a `np.random.Generator`, so a synthetic anomaly is a pure function
of its seed (stream.py gives sample g the generator `default_rng([seed, g])`).

Two deliberate differences from the authors' code (docs/method.md): an empty mask is
redrawn (they keep it: about 5 % of their "anomalies" are unchanged normal images labelled
as anomalies), and the blend is rounded to the nearest grey level (they truncate).
"""

import os

import numpy as np
from scipy import ndimage

from . import data
from .cli import UserError, require_dir
from .masks import FOREGROUND_MODES, foreground_mask, foreground_rule, perlin_mask
from .textures import list_dtd_images, rand_augment

MAX_MASK_TRIES = 16  # redraws before the fallback blob (rarely reached)
MAX_PASTE_TRIES = 8  # appearance redraws before the most visible draw is kept
PASTE_CONTRAST_WINDOW = 7  # pixels, at any input size (the grain a paste must stand out from)
SDAS_DELTA = (0.5, 1.0)  # transparency ranges of the authors' configs
DTD_DELTA = (0.2, 1.0)
SOURCE_CACHE_BYTES = 128 * 2**20  # resized appearances kept decoded, per process (see `image`)
_warned_auto = set()


def paste_contrast(image, anomalous, mask, window=PASTE_CONTRAST_WINDOW):
    """How much the paste changed the image where it was pasted, in units of the image's own
    local variation there: RMS of (A - I) over the masked pixels and channels, divided by the
    RMS over the same pixels of I's local standard deviation (a `window`-pixel square, per
    channel). Local, so that on an object the flat surface a defect sits on counts as flat,
    while on a high-frequency texture (granite, sand) the grain is what a paste must stand
    out from. At least one grey level. 0 for an empty mask."""
    inside = np.asarray(mask) > 0
    if not inside.any():
        return 0.0
    clean = image.astype(np.float64)
    mean = ndimage.uniform_filter(clean, size=(window, window, 1), mode="reflect")
    square = ndimage.uniform_filter(clean**2, size=(window, window, 1), mode="reflect")
    local_var = np.maximum(square - mean**2, 0.0)
    change = np.sqrt(np.mean((anomalous[inside].astype(np.float64) - clean[inside]) ** 2))
    spread = np.sqrt(np.mean(local_var[inside]))
    return float(change / max(spread, 1.0))


def blend(image, source, mask, delta):
    """A = (1 - M) I + M (delta P + (1 - delta) I), rounded to uint8 (paper eq. 3)."""
    i = image.astype(np.float64)
    m = np.asarray(mask, np.float64)[..., None]
    out = (1.0 - m) * i + m * (delta * source.astype(np.float64) + (1.0 - delta) * i)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


_decoded = set()  # paths already decoded in full by this process (unified runs share DTD)


def decode_all(paths, what, log=print):
    """Decode every image of an anomaly source in full, once, before training: an image is
    drawn at random, so a truncated one (its header reads fine) would otherwise stop the run
    at whatever step first draws it, hours in at paper scale. UserError naming the file."""
    todo = [p for p in paths if p not in _decoded]
    if len(todo) > 500:
        log(f"checking that {len(todo)} {what}s decode (a damaged one would stop training later)")
    for path in todo:
        data.decode_fully(path, what)
        _decoded.add(path)


class AnomalySource:
    """Where anomaly appearances come from: an SDAS folder (every image file in it) and/or a
    DTD folder. `draw(rng)` -> (P uint8 (S,S,3), delta, kind, path)."""

    def __init__(self, size, sdas_dir=None, dtd_dir=None):
        if not sdas_dir and not dtd_dir:
            raise UserError(
                "no anomaly source: give an SDAS folder (--sdas, made by synthesize.py) "
                "and/or a DTD folder (--dtd, with images/<texture>/*.jpg)"
            )
        self.size = size
        self.sdas, self.dtd = [], []
        self._images, self._cached_bytes = {}, 0
        if sdas_dir:
            require_dir(sdas_dir, "--sdas")
            self.sdas = data.list_images(sdas_dir)
            if not self.sdas:
                raise UserError(
                    f"--sdas: folder {sdas_dir!r} has no images "
                    "(expected the PNGs written by synthesize.py)"
                )
        if dtd_dir:
            require_dir(dtd_dir, "--dtd")
            self.dtd = list_dtd_images(dtd_dir)
            if not self.dtd:
                raise UserError(
                    f"--dtd: folder {dtd_dir!r} has no images (expected images/<texture>/*.jpg)"
                )
        self.sdas_dir, self.dtd_dir = sdas_dir, dtd_dir
        decode_all(self.sdas, "--sdas image")
        decode_all(self.dtd, "--dtd image")

    def describe(self):
        return {
            "sdas_dir": self.sdas_dir and os.path.abspath(self.sdas_dir),
            "sdas_images": len(self.sdas),
            "dtd_dir": self.dtd_dir and os.path.abspath(self.dtd_dir),
            "dtd_images": len(self.dtd),
        }

    def image(self, path):
        """The source image at `path`, resized to the input size, read-only. Decoding is a
        third of a synthetic anomaly's cost and the demo draws each of its ~90 sources hundreds
        of times, so each is decoded once per process, until SOURCE_CACHE_BYTES are held (at
        paper scale, DTD's 5640 images do not all fit: the rest are decoded at every draw)."""
        if path in self._images:
            return self._images[path]
        image = data.load_image(path, self.size)
        if self._cached_bytes + image.nbytes <= SOURCE_CACHE_BYTES:
            image.setflags(write=False)  # shared by every later draw: nothing may change it
            self._images[path] = image
            self._cached_bytes += image.nbytes
        return image

    def draw(self, rng):
        use_sdas = bool(self.sdas) and (not self.dtd or rng.random() < 0.5)
        if use_sdas:
            path = self.sdas[int(rng.integers(len(self.sdas)))]
            return self.image(path), rng.uniform(*SDAS_DELTA), "sdas", path
        path = self.dtd[int(rng.integers(len(self.dtd)))]
        texture = rand_augment(self.image(path), rng)  # squashed to size, no crop
        return texture, rng.uniform(*DTD_DELTA), "dtd", path


class AnomalySynthesizer:
    """image -> (anomalous image, mask) for one category (paper eq. 3)."""

    def __init__(
        self,
        category,
        dataset_format,
        size,
        sdas_dir=None,
        dtd_dir=None,
        foreground="category",
        min_contrast=0.0,
    ):
        if foreground not in FOREGROUND_MODES:
            raise UserError(
                f"unknown foreground mode {foreground!r} (expected {', '.join(FOREGROUND_MODES)})"
            )
        self.category, self.dataset_format, self.size, self.foreground = (
            category,
            dataset_format,
            size,
            foreground,
        )
        self.min_contrast = min_contrast
        self.source = AnomalySource(size, sdas_dir, dtd_dir)
        rule = foreground_rule(category, dataset_format)
        if foreground == "category" and rule == "auto" and category not in _warned_auto:
            _warned_auto.add(category)
            print(
                f"note: no foreground rule for category {category!r}; using --foreground auto "
                "(Otsu, the side that owns the border is background)"
            )

    def describe(self):
        return {
            "category": self.category,
            "dataset_format": self.dataset_format,
            "size": self.size,
            "foreground": self.foreground,
            "min_paste_contrast": self.min_contrast,
            **self.source.describe(),
        }

    def draw_mask(self, foreground, rng):
        """Perlin x foreground, redrawn until it is not empty; after MAX_MASK_TRIES misses
        (a tiny foreground) an ellipse centred on a random foreground pixel."""
        if foreground.sum() < 1:  # a threshold that found nothing must not block synthesis
            foreground = np.ones_like(foreground)
        for _ in range(MAX_MASK_TRIES):
            mask = perlin_mask(self.size, rng) * foreground
            if mask.any():
                return mask
        ys, xs = np.nonzero(foreground)
        k = int(rng.integers(len(ys)))
        ry, rx = rng.uniform(self.size / 32, self.size / 8, size=2)
        yy, xx = np.mgrid[: self.size, : self.size]
        ellipse = ((yy - ys[k]) / ry) ** 2 + ((xx - xs[k]) / rx) ** 2 <= 1.0
        return ellipse.astype(np.float32) * foreground

    def synthesize(self, image, rng):
        """dict(anomalous, mask, kind, delta, source, contrast): everything a picture of it
        needs. The appearance (source image and delta) is redrawn, the mask kept, while the
        paste changes the image less than `min_contrast` (`paste_contrast`); after
        MAX_PASTE_TRIES draws the most visible one is kept."""
        fg = foreground_mask(image, self.category, self.dataset_format, self.foreground)
        mask = self.draw_mask(fg, rng)
        best = None
        for _ in range(MAX_PASTE_TRIES):
            source, delta, kind, path = self.source.draw(rng)
            anomalous = blend(image, source, mask, delta)
            contrast = paste_contrast(image, anomalous, mask)
            if best is None or contrast > best["contrast"]:
                best = dict(anomalous=anomalous, kind=kind, delta=delta, source=path)
                best["contrast"] = contrast
            if contrast >= self.min_contrast:
                break
        return dict(best, mask=mask, foreground=fg)


def synthesizers_for(
    categories,
    dataset_format,
    size,
    sdas_dir=None,
    dtd_dir=None,
    foreground="category",
    min_contrast=0.0,
):
    """One synthesizer per category, for `stream.AnomalyStream`: each applies its own
    category's foreground rule. With several categories (one unified model) `sdas_dir`
    holds one SDAS folder per category, sdas_dir/<category>."""

    def sdas_folder(category):
        return os.path.join(sdas_dir, category) if sdas_dir and len(categories) > 1 else sdas_dir

    return {
        c: AnomalySynthesizer(
            c, dataset_format, size, sdas_folder(c), dtd_dir, foreground, min_contrast
        )
        for c in categories
    }
