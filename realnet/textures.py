"""What a DTD anomaly looks like: a texture with three random augmentations.

The ten augmentations are those of the authors' DTD source (MemSeg's rand_augment, written
with imgaug there), here with PIL and numpy. Each maps (uint8 HxWx3, rng) -> uint8 HxWx3;
the comment beside each names the imgaug augmenter it stands for.
"""

import os

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from . import data


def _gamma_contrast(x, rng):  # GammaContrast((0.5, 2.0), per_channel=True)
    gamma = rng.uniform(0.5, 2.0, size=3)
    return (255.0 * (x / 255.0) ** gamma + 0.5).astype(np.uint8)


def _brightness(x, rng):  # MultiplyAndAddToBrightness(mul=(0.8,1.2), add=(-30,30))
    ycbcr = np.asarray(Image.fromarray(x).convert("YCbCr")).astype(np.float32)
    ycbcr[..., 0] = np.clip(ycbcr[..., 0] * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30), 0, 255)
    return np.asarray(Image.fromarray(ycbcr.astype(np.uint8), "YCbCr").convert("RGB"))


def _sharpness(x, rng):  # pillike.EnhanceSharpness(factor (0, 2))
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(x)).enhance(rng.uniform(0.0, 2.0)))


def _hue_saturation(x, rng):  # AddToHueAndSaturation((-50, 50), per_channel=True)
    hsv = np.asarray(Image.fromarray(x).convert("HSV")).astype(np.int32)
    hue, saturation = rng.integers(-50, 51, size=2)
    hsv[..., 0] = (hsv[..., 0] + hue) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + saturation, 0, 255)
    return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))


def _solarize(x, rng):  # Solarize(p=0.5, threshold=(32, 128))
    if rng.random() >= 0.5:
        return x
    return np.where(x >= rng.uniform(32, 128), 255 - x, x).astype(np.uint8)


def _posterize(x, rng):  # Posterize(nb_bits (1, 8))
    return np.asarray(ImageOps.posterize(Image.fromarray(x), int(rng.integers(1, 9))))


def _invert(x, rng):  # Invert()
    return 255 - x


def _autocontrast(x, rng):  # pillike.Autocontrast(cutoff (0, 20))
    return np.asarray(ImageOps.autocontrast(Image.fromarray(x), cutoff=int(rng.integers(0, 21))))


def _equalize(x, rng):  # pillike.Equalize()
    return np.asarray(ImageOps.equalize(Image.fromarray(x)))


def _rotate(x, rng):  # Affine(rotate=(-45, 45)), bilinear, black outside
    return np.asarray(
        Image.fromarray(x).rotate(rng.uniform(-45, 45), Image.BILINEAR, fillcolor=(0, 0, 0))
    )


DTD_AUGMENTATIONS = (
    _gamma_contrast,
    _brightness,
    _sharpness,
    _hue_saturation,
    _solarize,
    _posterize,
    _invert,
    _autocontrast,
    _equalize,
    _rotate,
)


def rand_augment(image, rng, n=3):
    """n distinct augmentations out of the ten, applied in the drawn order."""
    for k in rng.choice(len(DTD_AUGMENTATIONS), size=n, replace=False):
        image = np.ascontiguousarray(DTD_AUGMENTATIONS[k](image, rng), dtype=np.uint8)
    return image


def list_dtd_images(dtd_dir):
    """Every image under <dtd>/images/*/ (the DTD archive layout); a folder that is itself
    the images/ folder, or holds the images directly, works too."""
    root = (
        os.path.join(dtd_dir, "images")
        if os.path.isdir(os.path.join(dtd_dir, "images"))
        else dtd_dir
    )
    files = data.list_images(root)
    for sub in sorted(os.listdir(root)):
        if os.path.isdir(os.path.join(root, sub)):
            files += data.list_images(os.path.join(root, sub))
    return files
