"""A tiny RealNet checkpoint in the format train_realnet.py writes (random backbone, random
weights: tests/test_invariance.py's tiny_model), with an OK/NG threshold chosen so that a
given set of images falls on both sides of it (a calibration record as train_realnet.py
stores it); for the tests of --predict and --export,
which then need no training."""

import os

import numpy as np
import torch

from realnet import calibration, data, metrics
from test_invariance import SIZE, tiny_model


@torch.no_grad()
def scores_and_maps(model, features, paths, pool=16):
    """--predict's pipeline: PIL read and resize, ImageNet normalisation, forward, score."""
    images = torch.stack([data.to_tensor(data.load_image(p, SIZE)) for p in paths])
    maps = model(features(images), images.shape[-2:])["anomaly_map"].float()
    return metrics.image_scores(maps.numpy(), pool=pool), maps.numpy()


def write_checkpoint(path, threshold_images=(), anomaly_map="discriminator"):
    """model.pt at `path`; with `threshold_images`, an image threshold half-way between
    two of their scores (half NG, half OK, none close to it) and a pixel threshold at the
    median of their maps. Returns (model, features)."""
    model, features = tiny_model(anomaly_map)
    ckpt = {
        "kind": "realnet",
        "version": 1,
        "config": model.config,
        "step": 0,
        "state_dict": model.state_dict(),
        "selected_on": {"rule": "a test model"},
        "backbone": model.config["backbone"],
        "categories": ["washer"],
    }
    if threshold_images:
        scores, maps = scores_and_maps(model, features, list(threshold_images))
        ordered = np.sort(scores)
        middle = len(ordered) // 2
        image = float((ordered[middle - 1] + ordered[middle]) / 2)
        pixel = float(np.median(maps))
        scale = None
        if model.fused:
            scale = {
                key: getattr(model, f"map_{key}").tolist() for key in ("centre", "scale", "weight")
            }
        ckpt["calibration"] = {
            "kind": calibration.KIND,
            "version": 1,
            "rule": "fpr",
            "target_fpr": 0.5,
            "weights_digest": calibration.weights_digest(model.state_dict()),
            "image": image,
            "pixel": pixel,
            "fitted": {"image": image, "pixel": pixel},
            "set_by": "calibration",
            "image_score": "avgpool",
            "pool": 16,
            "precision": "fp32",
            "map_scale": scale,
            "good_images": len(threshold_images),
            "notes": [],
            "source": "a test's images (tests/deploy_model.py)",
        }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(ckpt, path)
    return model, features
