"""Reading anomaly-detection data sets: which images are normal, which are defective, where
their masks are (docs/method.md, section 2).

Supported layouts (`open_dataset(root, format="auto")` recognises them from the folder):

  mvtec, mpdd  MVTec AD and MPDD (and the embedded demo data set, see demo_data.py):
                   <root>/<category>/train/good/*.png
                   <root>/<category>/test/good/*.png
                   <root>/<category>/test/<defect>/NNN.png
                   <root>/<category>/ground_truth/<defect>/NNN_mask.png
  btad         BTAD: the same tree with "ok" for good and "ko" for defective,
                   <root>/<01|02|03>/train/ok/NNNN.bmp, test/ok, test/ko,
                   ground_truth/ko/NNNN.png (.bmp for class 03; the mask has the image's name)
  visa         VisA as the RealNet authors re-formatted it (the same tree as BTAD):
                   <root>/<category>/train/ok/NNNN.JPG, test/ok, test/ko, ground_truth/ko/NNN.png
  visa_csv     VisA as downloaded (VisA_20220922), read through its official 1-class split:
                   <root>/split_csv/1cls.csv with the columns object,split,label,image,mask;
                   paths relative to <root>, e.g. candle/Data/Images/Anomaly/000.JPG and
                   candle/Data/Masks/Anomaly/000.png; label "normal" or "anomaly"
  folder       one category of your own, the MVTec tree without the category level:
                   <root>/train/good/*        normal training images
                                              ("ok" and "normal" also accepted)
                   <root>/test/good/*         normal test images      (same names accepted)
                   <root>/test/<defect>/*     defective test images, one folder per defect type
                   <root>/masks/<defect>/<name>.png or <name>_mask.png
                                              one mask per defective image ("ground_truth/" also
                                              accepted, so an MVTec category folder reads as is)
               The category is the name of <root>.

Training needs <category>/train/good only (the stages before evaluate.py never read the test
split); test/ and the masks are read and checked by `DatasetIndex.test`, where evaluate.py
uses them. In every layout a mask is found by the image's name: `<name>_mask.<ext>` or
`<name>.<ext>` with any image extension. Every defective test image needs a mask, every mask
needs its image, and a mask must have the size of its image; anything else is a `UserError`
naming the file.

Reading pixels, in one place (`load_image`, `load_mask`): the EXIF orientation is applied
to images and masks alike (upright, as a viewer shows them); every bit depth is put on the
8-bit scale (16-bit PNG/TIFF divided by 257, not clipped to white; float images from [0, 1]
or [0, 255]); palette, 1-bit, grey+alpha, RGBA and CMYK images read as RGB without alpha;
grey is replicated to RGB. A mask pixel is anomalous at 128 or above of 255 (`MASK_LEVEL`);
a mask whose values all lie below 128 is a label mask (VisA's class values): > 0 is
anomalous. A "mask" with more than 5 % grey pixels (between 32 and 223) or, below 128, more
than 16 distinct values is refused as not a mask. Training images are decoded in full when
the stage starts (`DatasetIndex.train`), so a truncated file stops it there. A file named
like an image that is a broken link, not readable or not a file is skipped, and one line
per folder counts them (`list_images`).

Category order: for the known data sets the authors' class-id order (docs/method.md), which the
class-conditional diffusion model uses; otherwise sorted. A category's class id is its
position in `DatasetIndex.categories`.
"""

import csv
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from .cli import UserError, require_dir

ORIENTATION_TAG = 0x0112  # EXIF Orientation
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
FORMATS = ("mvtec", "mpdd", "btad", "visa", "visa_csv", "folder")

# The authors' class-id order (utils/categories.py).
KNOWN_CATEGORIES = {
    "mvtec": [
        "bottle",
        "cable",
        "capsule",
        "carpet",
        "grid",
        "hazelnut",
        "leather",
        "metal_nut",
        "pill",
        "screw",
        "tile",
        "toothbrush",
        "transistor",
        "wood",
        "zipper",
    ],
    "visa": [
        "candle",
        "capsules",
        "cashew",
        "chewinggum",
        "fryum",
        "macaroni1",
        "macaroni2",
        "pcb1",
        "pcb2",
        "pcb3",
        "pcb4",
        "pipe_fryum",
    ],
    "mpdd": [
        "bracket_black",
        "bracket_brown",
        "bracket_white",
        "connector",
        "metal_plate",
        "tubes",
    ],
    "btad": ["01", "02", "03"],
}
NORMAL_FOLDERS = ("good", "ok", "normal")  # MVTec/MPDD say "good", BTAD/VisA "ok"
MASK_FOLDERS = ("ground_truth", "masks")

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclass(frozen=True)
class Sample:
    image: str  # path
    mask: str | None  # ground-truth mask; None for good images (and all training images)
    label: int  # 0 good, 1 anomalous
    defect: str  # "good" or the defect type (folder name; "ko" for BTAD/VisA re-format)
    category: str


# ----------------------------------------------------------------------------------------
# Reading pixels
# ----------------------------------------------------------------------------------------


def _open(path, what):
    """The decoded image at `path`, turned upright (its EXIF orientation applied, as every
    viewer shows it); UserError naming the file otherwise."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes every byte: a truncated file fails here, not later
            return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise UserError(f"{what} {path!r} does not exist")
    except Exception as e:  # not an image, truncated, unsupported
        first = f"{type(e).__name__}: {e}".splitlines()[0]
        raise UserError(f"{what} {path!r} is not a readable image ({first})")


def _levels(image, path, what):
    """The image's pixel values as float32 on the 8-bit scale 0..255: (H, W) for one channel,
    (H, W, C) for colour. 16- and 32-bit integer images (PIL modes I;16*, I: 16-bit PNG and
    TIFF) are scaled by 255/65535, not clipped (which would turn them white); float images
    (mode F) in [0, 1] are scaled by 255, in [0, 255] kept, in [0, 65535] scaled as 16 bits."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        return np.clip(np.asarray(image, np.float64), 0, 65535).astype(np.float32) * (255 / 65535)
    if mode == "F":
        values = np.asarray(image, np.float32)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 65535:
            raise UserError(
                f"{what} {path!r} is a float image with values outside [0, 65535] "
                "(expected [0, 1], [0, 255] or [0, 65535])"
            )
        top = values.max()
        return values * (255.0 if top <= 1 else 1.0 if top <= 255 else 255 / 65535)
    if mode in ("L", "RGB"):
        return np.asarray(image, np.float32)
    if mode == "1":  # 1-bit: 0 and 255
        return np.asarray(image.convert("L"), np.float32)
    if mode in ("LA", "La"):  # grey without its alpha channel
        return np.asarray(image.getchannel(0), np.float32)
    if mode in ("P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        # colour without the alpha channel (transparency is not what the camera saw); a
        # palette through RGBA, as PIL asks for palettes with a transparent entry
        source = image.convert("RGBA") if mode in ("P", "PA") else image
        return np.asarray(source.convert("RGB"), np.float32)
    raise UserError(f"{what} {path!r}: unsupported pixel format {mode!r}")


def _to_uint8(levels):
    return np.clip(np.rint(levels), 0, 255).astype(np.uint8)


def load_image(path, size=None):
    """(size, size, 3) uint8 RGB, upright (EXIF orientation applied); every bit depth on the
    8-bit scale (`_levels`), grey replicated to RGB, alpha dropped; PIL bilinear resize
    (antialiased when shrinking, as the authors' torchvision Resize). size=None keeps the
    original size."""
    levels = _to_uint8(_levels(_open(path, "image"), path, "image"))
    if levels.ndim == 2:
        levels = np.repeat(levels[..., None], 3, axis=-1)
    image = Image.fromarray(levels, "RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8).copy()


# A mask pixel is anomalous at MASK_LEVEL or above, of 255 (half the scale: a 0/255 mask saved
# as JPEG, with 1-3 in its background and 250-255 in its defect, reads as it was drawn). A
# mask whose values all lie below MASK_LEVEL is a label mask (VisA's: 0 and a small class
# value): any value > 0 is anomalous. A mask is refused when more than MASK_GREY_SHARE of its
# pixels are grey, between MASK_NEAR and 255 - MASK_NEAR (a photo or a soft map, not a mask),
# or when a label mask has more than MASK_MAX_LABELS distinct values.
MASK_LEVEL = 128
MASK_NEAR = 32
MASK_GREY_SHARE = 0.05
MASK_MAX_LABELS = 16


def binarize_mask(levels, path):
    """(H, W) levels on the 0..255 scale -> (H, W) bool, by the rule above; UserError naming
    the file when it is not a mask."""
    if levels.max() >= MASK_LEVEL:
        grey = float(np.mean((levels > MASK_NEAR) & (levels < 255 - MASK_NEAR)))
        if grey > MASK_GREY_SHARE:
            raise UserError(
                f"mask {path!r} is not a mask: {grey:.0%} of its pixels are grey "
                f"levels between {MASK_NEAR} and {255 - MASK_NEAR} (expected 0 for "
                f"normal and 255 for defect, at most {MASK_GREY_SHARE:.0%} between)"
            )
        return levels >= MASK_LEVEL
    labels = np.unique(levels)
    if len(labels) > MASK_MAX_LABELS:
        raise UserError(
            f"mask {path!r} is not a mask: {len(labels)} distinct values all below "
            f"{MASK_LEVEL} (expected 0 and 255, or 0 and a few class values)"
        )
    return levels > 0


def load_mask(path, size=None):
    """(size, size) float32 in {0, 1}, upright like its image (EXIF orientation applied):
    binarised by `binarize_mask` (at MASK_LEVEL of 255; a label mask: > 0). A colour mask is
    anomalous where any colour channel is; nearest resize so the mask stays binary."""
    levels = _levels(_open(path, "mask"), path, "mask")
    if levels.ndim == 3:
        levels = levels.max(axis=-1)
    binary = Image.fromarray(binarize_mask(levels, path).astype(np.uint8) * 255)
    if size is not None and binary.size != (size, size):
        binary = binary.resize((size, size), Image.NEAREST)
    return (np.asarray(binary) > 0).astype(np.float32)


def to_tensor(image_uint8):
    """(H, W, 3) uint8 -> (3, H, W) float32, ImageNet-normalised (the backbone's input).
    In numpy: small per-image work is much cheaper there than in torch's threaded kernels."""
    x = (np.asarray(image_uint8, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _orientation(image):
    """The EXIF orientation (1: upright) from the header. A PNG's eXIf chunk is read where it
    usually is, before the pixels: PIL's getexif() would decode the whole file to look for
    one after them."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return image.getexif().get(ORIENTATION_TAG, 1)


def image_size_of(path, what="image"):
    """(width, height) as `load_image` reads it (upright: EXIF orientations 5-8 swap the
    sides), from the file header only; UserError if it is not an image."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = _orientation(image) in (5, 6, 7, 8)
            return (height, width) if turned else (width, height)
    except FileNotFoundError:
        raise UserError(f"{what} {path!r} does not exist")
    except Exception as e:
        first = f"{type(e).__name__}: {e}".splitlines()[0]
        raise UserError(f"{what} {path!r} is not a readable image ({first})")


def decode_fully(path, what="image"):
    """Decode every byte of the image at `path` (a truncated file passes a header read and
    fails only when its pixels are needed); UserError naming the file otherwise."""
    _open(path, what)


class TestSet(torch.utils.data.Dataset):
    """Test images for evaluation: image, mask (zeros for good images), label, defect, path."""

    def __init__(self, samples, size=256):
        self.samples, self.size = list(samples), size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        mask = (
            load_mask(s.mask, self.size)
            if s.mask
            else np.zeros((self.size, self.size), np.float32)
        )
        return dict(
            image=to_tensor(load_image(s.image, self.size)),
            mask=torch.from_numpy(mask)[None],
            label=s.label,
            defect=s.defect,
            path=s.image,
            index=i,
        )


class DiffusionImages(torch.utils.data.Dataset):
    """Normal training images of the diffusion model (train_diffusion.py): (image in [-1, 1],
    class id).

    Decoded images are kept in memory when the whole set is small (under 512 MB)."""

    def __init__(self, samples, class_ids, size):
        self.samples, self.class_ids, self.size = samples, class_ids, size
        self.cache = {} if len(samples) * size * size * 3 < 512 * 2**20 else None

    def __len__(self):
        return len(self.samples)

    def image(self, i):
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        image = load_image(self.samples[i].image, self.size)
        if self.cache is not None:
            self.cache[i] = image
        return image

    def __getitem__(self, i):
        x = torch.from_numpy(self.image(i)).permute(2, 0, 1).float() / 127.5 - 1.0
        return x, self.class_ids[i]


def diffusion_training_images(index, size):
    """DiffusionImages of the normal training images of every category of `index` (a
    DatasetIndex); class id = the category's position in index.categories."""
    samples, class_ids = [], []
    for c, name in enumerate(index.categories):
        train = index.train(name)
        samples += train
        class_ids += [c] * len(train)
    return DiffusionImages(samples, class_ids, size)


# ----------------------------------------------------------------------------------------
# Listing folders
# ----------------------------------------------------------------------------------------


def is_image_file(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


_reported_skips = set()  # folders whose skipped files were already reported (once each)


def list_images(folder, log=print):
    """Image files directly in `folder`, sorted by path (other files are ignored). A name that
    looks like an image but cannot be read is skipped, and counted: one line per folder says
    how many and why (broken link, not readable, not a file)."""
    if not os.path.isdir(folder):
        return []
    found, skipped = [], {}
    for name in os.listdir(folder):
        if not is_image_file(name):
            continue
        path = os.path.join(folder, name)
        why = (
            "broken link"
            if os.path.islink(path) and not os.path.exists(path)
            else "not a file"
            if not os.path.isfile(path)
            else "not readable"
            if not os.access(path, os.R_OK)
            else None
        )
        if why:
            skipped.setdefault(why, []).append(path)
        else:
            found.append(path)
    if skipped and folder not in _reported_skips:
        _reported_skips.add(folder)
        reasons = ", ".join(
            f"{len(paths)} {why} (e.g. {sorted(paths)[0]!r})"
            for why, paths in sorted(skipped.items())
        )
        log(f"note: skipped {sum(map(len, skipped.values()))} file(s) in {folder}: {reasons}")
    return sorted(found)


def _subfolders(folder):
    return sorted(
        n
        for n in os.listdir(folder)
        if not n.startswith(".") and os.path.isdir(os.path.join(folder, n))
    )


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _first_existing(folder, names):
    for n in names:
        if os.path.isdir(os.path.join(folder, n)):
            return os.path.join(folder, n)
    return None


def _check_mask_size(image, mask):
    if image_size_of(image) != image_size_of(mask, "mask"):
        w, h = image_size_of(image)
        mw, mh = image_size_of(mask, "mask")
        raise UserError(f"mask {mask!r} is {mw}x{mh} but its image {image!r} is {w}x{h}")


def _read_train(category_dir, category):
    """The normal training images of one MVTec-like category (<category_dir>/train/good)."""
    train_root = os.path.join(category_dir, "train")
    normal = _first_existing(train_root, NORMAL_FOLDERS)
    if normal is None:
        raise UserError(
            f"{train_root!r}: expected a folder of normal training images "
            f"named {' or '.join(NORMAL_FOLDERS)}"
        )
    train = [Sample(p, None, 0, "good", category) for p in list_images(normal)]
    if not train:
        raise UserError(
            f"{normal!r}: no training images (expected {', '.join(IMAGE_EXTENSIONS)} files)"
        )
    return train


def _read_test(category_dir, category, mask_folders=MASK_FOLDERS):
    """The test images of one MVTec-like category, each defective one with its mask (checked:
    found, its image's size, no mask without its image)."""
    test_root = os.path.join(category_dir, "test")
    if not os.path.isdir(test_root):
        raise UserError(f"{category_dir!r}: no test folder (expected test/good and test/<defect>)")
    mask_root = _first_existing(category_dir, mask_folders)
    test, used_masks = [], set()
    for defect in _subfolders(test_root):
        images = list_images(os.path.join(test_root, defect))
        if defect in NORMAL_FOLDERS:
            test += [Sample(p, None, 0, "good", category) for p in images]
            for p in images:
                image_size_of(p)
            continue
        masks = {}
        if mask_root and os.path.isdir(os.path.join(mask_root, defect)):
            for m in list_images(os.path.join(mask_root, defect)):
                masks.setdefault(_stem(m), m)
        for p in images:
            mask = masks.get(_stem(p) + "_mask") or masks.get(_stem(p))
            if mask is None:
                where = os.path.join(
                    mask_root or os.path.join(category_dir, mask_folders[0]), defect
                )
                raise UserError(
                    f"defective test image {p!r} has no mask "
                    f"(expected {os.path.join(where, _stem(p) + '_mask.png')} or {_stem(p)}.png)"
                )
            _check_mask_size(p, mask)
            used_masks.add(mask)
            test.append(Sample(p, mask, 1, defect, category))
    if mask_root:  # a mask nobody uses is a mask whose image is missing
        for defect in _subfolders(mask_root):
            if defect in NORMAL_FOLDERS:
                continue
            for m in list_images(os.path.join(mask_root, defect)):
                if m not in used_masks:
                    stem = _stem(m)[:-5] if _stem(m).endswith("_mask") else _stem(m)
                    raise UserError(
                        f"mask {m!r} has no test image (expected "
                        f"{os.path.join(test_root, defect, stem)}.<png|jpg|bmp>)"
                    )
    if not test:
        raise UserError(f"{test_root!r}: no test images")
    return test


def _read_visa_csv(root, csv_path):
    """The official VisA split: rows object,split,label,image,mask -> {category: (train, test)}."""
    per_category = {}
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{csv_path!r} is not a readable CSV file ({type(e).__name__})")
    needed = {"object", "split", "label", "image", "mask"}
    if not rows or not needed <= set(rows[0]):
        raise UserError(
            f"{csv_path!r}: expected the columns {','.join(sorted(needed))} "
            "(VisA's split_csv/1cls.csv)"
        )
    for line, row in enumerate(rows, start=2):
        category, split, label = row["object"].strip(), row["split"].strip(), row["label"].strip()
        image = os.path.join(root, row["image"].strip())
        mask = row["mask"].strip()
        train, test = per_category.setdefault(category, ([], []))
        if split == "train":
            train.append(Sample(image, None, 0, "good", category))
        elif split == "test" and label == "normal":
            test.append(Sample(image, None, 0, "good", category))
        elif split == "test" and label == "anomaly":
            if not mask:
                raise UserError(
                    f"{csv_path!r} line {line}: anomalous test image {row['image']!r} has no mask"
                )
            test.append(Sample(image, os.path.join(root, mask), 1, "anomaly", category))
        else:
            raise UserError(
                f"{csv_path!r} line {line}: unknown split/label {split!r}/{label!r} "
                "(expected train|test and normal|anomaly)"
            )
    return per_category


# ----------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------


class DatasetIndex:
    """What `open_dataset` returns: the categories and, per category, the samples."""

    def __init__(self, format, root, categories, category_dirs=None, csv_samples=None):
        self.format, self.root, self.categories = format, root, categories
        self._category_dirs = category_dirs or {}
        self._csv_samples = csv_samples
        self._train, self._test = {}, {}

    def __repr__(self):
        return (
            f"DatasetIndex(format={self.format!r}, root={self.root!r}, "
            f"categories={self.categories})"
        )

    def class_id(self, category):
        return self.categories.index(self._check(category))

    def _check(self, category):
        if category not in self.categories:
            raise UserError(
                f"category {category!r} is not in {self.root!r} "
                f"({self.format} layout; it has: {', '.join(self.categories)})"
            )
        return category

    def train(self, category):
        """Normal training images, sorted by path. Every one is decoded in full once here, so
        that a truncated file stops the stage at its start, not hours into training. The test
        split is not read: training needs the training images only."""
        self._check(category)
        if category not in self._train:
            if self._csv_samples is not None:
                train = self._csv_samples[category][0]
                if not train:
                    raise UserError(
                        f"{self.root!r}: no training images of {category!r} in split_csv/1cls.csv"
                    )
            else:
                train = _read_train(self._category_dirs[category], category)
            for s in train:
                decode_fully(s.image)
            self._train[category] = sorted(train, key=lambda s: s.image)
        return list(self._train[category])

    def test(self, category):
        """Test images (good and defective, with masks), sorted by path; the masks are checked
        here, where the test split is used (evaluate.py)."""
        self._check(category)
        if category not in self._test:
            if self._csv_samples is not None:
                test = self._csv_samples[category][1]
                if not test:
                    raise UserError(
                        f"{self.root!r}: no test images of {category!r} in split_csv/1cls.csv"
                    )
                for s in test:
                    image_size_of(s.image)
                    if s.mask:
                        _check_mask_size(s.image, s.mask)
            else:
                test = _read_test(self._category_dirs[category], category)
            self._test[category] = sorted(test, key=lambda s: s.image)
        return list(self._test[category])

    def describe(self):
        """JSON-friendly identity (stored in the files the stages write)."""
        return {
            "root": os.path.abspath(self.root),
            "format": self.format,
            "categories": self.categories,
        }


def _order(names, format):
    """Known data sets: the authors' class-id order; anything else: sorted."""
    known = KNOWN_CATEGORIES.get("visa" if format == "visa_csv" else format, [])
    if names and all(n in known for n in names):
        return [n for n in known if n in names]
    return sorted(names)


def _tree_categories(root):
    """Sub-folders of root that look like an MVTec-like category: they have train/ (test/ is
    optional: training needs the training images only)."""
    return [n for n in _subfolders(root) if os.path.isdir(os.path.join(root, n, "train"))]


def _tree_format(root, names):
    """mvtec/mpdd/btad/visa for a tree of categories: the normal folder tells ok/ko layouts
    apart, the category names tell which data set (unknown names: mvtec or visa)."""
    uses_ok = any(os.path.isdir(os.path.join(root, n, "train", "ok")) for n in names)
    if uses_ok:
        return "btad" if any(n in KNOWN_CATEGORIES["btad"] for n in names) else "visa"
    if names and all(n in KNOWN_CATEGORIES["mpdd"] for n in names):
        return "mpdd"
    return "mvtec"


def detect_format(root):
    if os.path.isfile(os.path.join(root, "split_csv", "1cls.csv")):
        return "visa_csv"
    if _first_existing(os.path.join(root, "train"), NORMAL_FOLDERS):
        return "folder"
    names = _tree_categories(root)
    if names:
        return _tree_format(root, names)
    raise UserError(
        f"{root!r}: unknown layout; expected <category>/train/good (+ <category>/test for "
        "evaluation: MVTec, MPDD, BTAD, VisA), split_csv/1cls.csv (VisA download) or "
        "train/good (+ test/<defect> + masks/: folder)"
    )


def open_dataset(root, format="auto", categories=None):
    """Index a data set folder. format: "auto" or one of FORMATS; categories: restrict to
    these (a list or a comma-separated string). UserError on any problem."""
    require_dir(root, "data set")
    if format not in ("auto",) + FORMATS:
        raise UserError(
            f"unknown data set format {format!r} (expected auto, {', '.join(FORMATS)})"
        )
    fmt = detect_format(root) if format == "auto" else format
    category_dirs, csv_samples = {}, None
    if fmt == "visa_csv":
        csv_path = os.path.join(root, "split_csv", "1cls.csv")
        if not os.path.isfile(csv_path):
            raise UserError(
                f"{root!r}: no split_csv/1cls.csv (the visa_csv layout is VisA as downloaded)"
            )
        csv_samples = _read_visa_csv(root, csv_path)
        names = list(csv_samples)
    elif fmt == "folder":
        if not os.path.isdir(os.path.join(root, "train")):
            raise UserError(
                f"{root!r}: no train/ folder (the folder layout is train/good, "
                "test/good, test/<defect>, masks/<defect>)"
            )
        name = os.path.basename(os.path.abspath(root))
        category_dirs[name] = root
        names = [name]
    else:
        names = _tree_categories(root)
        if not names:
            raise UserError(f"{root!r}: no <category>/train folders ({fmt} layout)")
        category_dirs = {n: os.path.join(root, n) for n in names}
    ordered = _order(names, fmt)
    if categories is not None:
        wanted = [
            c for c in (categories.split(",") if isinstance(categories, str) else categories) if c
        ]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise UserError(
                f"category {missing[0]!r} is not in {root!r} "
                f"({fmt} layout; it has: {', '.join(ordered)})"
            )
        ordered = [c for c in ordered if c in wanted]
    return DatasetIndex(fmt, root, ordered, category_dirs, csv_samples)


def open_recorded_dataset(root, format, recorded, what):
    """--data ROOT (with --format) when given, else the data set a file records
    (its `dataset` entry, data.DatasetIndex.describe())."""
    if root:
        return open_dataset(root, format)
    if not recorded or not recorded.get("root"):
        raise UserError(f"--data is needed: {what} does not record its data set")
    return open_dataset(recorded["root"], recorded.get("format", "auto"))
