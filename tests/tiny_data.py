"""Tiny data-set trees for the tests (a few 24-40 px images per folder)."""

import os

import numpy as np
import torch
from PIL import Image

SIZE = 64  # the side of the tiny demo data set and models


def write_image(path, size=(40, 32), mode="RGB", value=None, seed=0):
    """A random (or constant) image of `size` (w, h) and PIL `mode`, format from the extension."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    array = (
        np.full(shape, value, np.uint8)
        if value is not None
        else rng.integers(0, 256, shape, dtype=np.uint8)
    )
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".png": "PNG"}[
        os.path.splitext(path)[1].lower()
    ]
    Image.fromarray(array, mode).save(path, format=fmt)
    return path


def write_mask(path, size=(40, 32), value=255, box=(5, 5, 15, 15)):
    """A mask with one rectangle of `value` (VisA uses small class values, MVTec 255)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mask = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = value
    fmt = "BMP" if path.lower().endswith(".bmp") else "PNG"
    Image.fromarray(mask).save(path, format=fmt)
    return path


def mvtec_tree(
    root,
    categories=("bottle", "screw"),
    normal="good",
    defects=("scratch",),
    ext=".png",
    mask_ext=".png",
    mask_suffix="_mask",
    gray=False,
    n=2,
    mask_folder="ground_truth",
):
    """<root>/<cat>/train/<normal>, test/<normal>, test/<defect>, <mask_folder>/<defect>."""
    mode = "L" if gray else "RGB"
    for c in categories:
        base = os.path.join(root, c)
        for i in range(n):
            write_image(os.path.join(base, "train", normal, f"{i:03d}{ext}"), mode=mode, seed=i)
            write_image(
                os.path.join(base, "test", normal, f"{i:03d}{ext}"), mode=mode, seed=10 + i
            )
            for d in defects:
                write_image(os.path.join(base, "test", d, f"{i:03d}{ext}"), mode=mode, seed=20 + i)
                write_mask(os.path.join(base, mask_folder, d, f"{i:03d}{mask_suffix}{mask_ext}"))
    return root


def random_backbone_identity():
    from realnet.backbone import load_backbone

    return load_backbone("random", (1,)).identity


def write_afs(
    path,
    category="washer",
    input_size=SIZE,
    backbone=None,
    layers=(1, 2),
    dims=(8, 16),
    **recorded,
):
    """An AFS file in the format select_features.py writes (`recorded`: e.g. its dataset and
    anomaly_source entries)."""
    channels = {1: 256, 2: 512, 3: 1024, 4: 2048}
    g = torch.Generator().manual_seed(0)
    torch.save(
        {
            "kind": "afs",
            "version": 1,
            "layers": list(layers),
            "dims": list(dims),
            "indices": [
                torch.sort(torch.randperm(channels[l], generator=g)[:d]).values
                for l, d in zip(layers, dims)
            ],
            "scores": [torch.rand(channels[l], generator=g) for l in layers],
            "backbone": backbone or random_backbone_identity(),
            "input_size": input_size,
            "category": category,
            **recorded,
        },
        path,
    )
    return path
