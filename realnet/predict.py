"""What evaluate.py --predict writes for each image of a folder (no labels needed):

    predictions.csv       file, score, decision (OK / NG, empty without a threshold),
                          threshold (the image threshold), mask, map (paths under OUT)
    maps/<name>.npy       the raw anomaly map, float32, at the model's input size (S x S):
                          class 1 of the discriminator's softmax, in [0, 1], or for a model
                          trained with --anomaly-map fused its standard scores (unbounded)
    masks/<name>.png      the binary defect mask at the input image's own size: 255 where
                          the map, bilinearly resized to that size, is >= the pixel
                          threshold, else 0 (only with a threshold)
    threshold.json        the threshold used and the weights it belongs to (editable;
                          evaluate.py --threshold-file reads it back)

Decision: NG when the image score (the one evaluate.py reports, --image-score) is >= the
image threshold. The mask is the pixel threshold applied to the map as it is, whatever
the decision: an OK image can show a small region, which says where it came closest.
"""
import io
import os

import numpy as np
from PIL import Image

from . import data
from .files import atomic_save_image, atomic_write_bytes

CSV_COLUMNS = ["file", "score", "decision", "threshold", "mask", "map"]


def output_names(paths):
    """A file name stem per image: the stem, or the whole file name where two images share
    a stem (a.png and a.jpg)."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return [s if stems.count(s) == 1 else os.path.basename(p).replace(".", "_")
            for s, p in zip(stems, paths)]


def decide(score, image_threshold):
    """'NG' when score >= the image threshold, 'OK' below it, '' without a threshold."""
    if image_threshold is None:
        return ""
    return "NG" if np.float32(score) >= np.float32(image_threshold) else "OK"


def binary_mask(anomaly_map, pixel_threshold, size):
    """(height, width) uint8 0/255: the map resized (bilinear) to size = (width, height),
    then thresholded."""
    resized = Image.fromarray(np.asarray(anomaly_map, dtype=np.float32), mode="F")
    if resized.size != tuple(size):
        resized = resized.resize(tuple(size), Image.BILINEAR)
    return np.where(np.asarray(resized) >= np.float32(pixel_threshold), 255, 0).astype(np.uint8)


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float32))
    return buffer.getvalue()


def write_image_outputs(path, name, anomaly_map, score, threshold, out):
    """The map, the mask (with a pixel threshold) and the CSV row of one image."""
    map_path = os.path.join("maps", name + ".npy")
    atomic_write_bytes(os.path.join(out, map_path), npy_bytes(anomaly_map))
    image_threshold = threshold and threshold.get("image")
    pixel_threshold = threshold and threshold.get("pixel")
    mask_path = ""
    if pixel_threshold is not None:
        mask_path = os.path.join("masks", name + ".png")
        mask = binary_mask(anomaly_map, pixel_threshold, data.image_size_of(path))
        atomic_save_image(Image.fromarray(mask, mode="L"), os.path.join(out, mask_path))
    # 9 significant digits: a float32 read back exactly, so the CSV shows what was compared
    return [path, f"{float(score):.9g}", decide(score, image_threshold),
            "" if image_threshold is None else f"{image_threshold:.9g}", mask_path, map_path]
