"""Choosing the checkpoint without the test set: a share of the TRAINING images is held
out, given synthetic anomalies like the training samples, and scored with the test
metrics. (The authors choose their checkpoint on the test set; docs/method.md.)
"""
import os

import numpy as np
import torch

from . import metrics, runs, viz
from .cli import UserError
from .files import atomic_save_image


def split_validation(samples, fraction, seed):
    """Hold out a share of the training images (never test images) for checkpoint choice."""
    if fraction <= 0:
        return samples, []
    if fraction >= 1:
        raise UserError(f"--val-fraction must be below 1, got {fraction}")
    n_val = max(1, int(round(fraction * len(samples))))
    if n_val >= len(samples):
        raise UserError(f"--val-fraction {fraction} leaves no training images "
                        f"({len(samples)} in all)")
    rng = np.random.default_rng([seed, 7])
    held_out = set(rng.choice(len(samples), n_val, replace=False).tolist())
    return ([s for i, s in enumerate(samples) if i not in held_out],
            [s for i, s in enumerate(samples) if i in held_out])


def make_validation_set(stream, n_images):
    """Fixed samples: every held-out image once normal and once with a synthetic anomaly."""
    items = [stream[g] for g in range(2 * n_images)]
    return {key: torch.stack([it[key] for it in items]) for key in ("image", "mask")} | \
        {"anomalous": torch.tensor([it["anomalous"] for it in items])}


@torch.no_grad()
def validation_maps(model, features, val, device, batch_size):
    """The anomaly maps (N, S, S) of the validation set, in eval mode, as numpy."""
    was_training = model.training
    model.eval()
    maps = []
    for start in range(0, len(val["image"]), batch_size):
        images = val["image"][start:start + batch_size].to(device)
        maps.append(model(features(images), images.shape[-2:])["anomaly_map"].float().cpu())
    model.train(was_training)
    return torch.cat(maps).numpy()


def validation_metrics(maps, val):
    masks = val["mask"][:, 0].numpy()
    labels = masks.reshape(len(masks), -1).max(axis=1) > 0
    return {"pixel_auroc": metrics.pixel_auroc(maps, masks), "au_pro": metrics.au_pro(maps, masks),
            "image_auroc": metrics.image_auroc(labels, metrics.image_scores(maps))}


def validate(model, features, val, device, batch_size):
    return validation_metrics(validation_maps(model, features, val, device, batch_size), val)


VAL_LOG = "val.jsonl"
VAL_METRICS = {"pixel_auroc": "pixel AUROC", "au_pro": "AU-PRO", "image_auroc": "image AUROC"}
LOSSES = {"loss": "loss", "segmentation": "segmentation (CE)",
          "reconstruction": "reconstruction (MSE)"}


def write_learning_curve(out):
    """OUT/learning_curve.png: the held-out validation metrics (top) and the training loss
    (bottom) against the step, from val.jsonl and loss.jsonl."""
    def curves(log_name, names):
        entries = runs.read_log(os.path.join(out, log_name))
        return {label: ([e["step"] for e in entries], [e.get(key) for e in entries])
                for key, label in names.items()}
    top = viz.line_chart(curves(VAL_LOG, VAL_METRICS), "validation on held-out TRAINING images "
                         "with synthetic anomalies (never the test set)", "step", "metric",
                         y_range=(0, 1))
    bottom = viz.line_chart(curves(runs.LOG_FILE, LOSSES), "training loss", "step", "loss")
    picture = viz.to_pil(np.concatenate([top, bottom]))
    atomic_save_image(picture, os.path.join(out, "learning_curve.png"))
