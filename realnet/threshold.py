"""The decision threshold: OK or NG without test labels (docs/method.md, "Evaluation").

At the end of training (train_realnet.py --val-fraction), the held-out TRAINING images,
each clean or with a synthetic anomaly (realnet/validation.py), choose two thresholds:

    image   an image is NG when its score (the score evaluate.py reports) is >= it
    pixel   the binary defect mask is (anomaly map >= it)

by one of two rules (--threshold-rule):

    f1      the F1-optimal threshold: normal held-out images against their synthetic
            anomalies (pixels against the synthetic masks for the pixel threshold)
    fpr     the lowest threshold at which at most --target-fpr of the held-out NORMAL
            images (pixels of the normal images) are called NG; it needs no anomalies,
            and with n normal images an FPR finer than 1/n cannot be resolved

The choice is stored in model.pt (and best.pt) with how it was made, and is what
evaluate.py --predict decides with. A threshold file (threshold.json, written by
evaluate.py --predict, editable by hand) names the weights it belongs to by their digest,
so a file made for another checkpoint is refused.
"""
import hashlib
import json
import os

import numpy as np
import torch

from . import metrics
from .cli import UserError

RULES = {"f1": "F1-optimal on held-out normal images vs their synthetic anomalies",
         "fpr": "at most the target false-positive rate on held-out normal images"}
FILE_KIND = "realnet_threshold"


def fpr_threshold(normal_values, target_fpr):
    """The lowest t such that at most floor(target_fpr * n) of the n normal values are
    >= t (what `value >= t` would call NG): just above the (k+1)-th largest value."""
    values = np.sort(np.asarray(normal_values, dtype=np.float32).ravel())[::-1]
    allowed = int(np.floor(target_fpr * len(values)))
    if allowed >= len(values):
        return float(values[-1])
    return float(np.nextafter(values[allowed], np.float32(np.inf)))


def share_at_least(values, threshold):
    values = np.asarray(values, dtype=np.float32)
    return float((values >= np.float32(threshold)).mean()) if values.size else None


def choose(maps, masks, rule="f1", target_fpr=0.01, image_score="avgpool", pool=16):
    """Image and pixel thresholds from held-out maps (N, H, W) and their synthetic masks.
    Returns a dict of plain numbers and strings (what a checkpoint stores), or None when
    the rule cannot be applied (f1 needs normal and anomalous images)."""
    if rule not in RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; expected one of {sorted(RULES)}")
    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks) > 0
    anomalous = masks.reshape(len(masks), -1).any(axis=1)
    normal = ~anomalous
    scores = metrics.image_scores(maps, pool="max" if image_score == "max" else pool)
    if not normal.any() or (rule == "f1" and not anomalous.any()):
        return None
    if rule == "f1":
        image, _ = metrics.f1_optimal_threshold(scores, anomalous)
        pixel, _ = metrics.f1_optimal_threshold(maps, masks)
    else:
        image = fpr_threshold(scores[normal], target_fpr)
        pixel = fpr_threshold(maps[normal], target_fpr)
    called_ng = scores >= np.float32(image)
    true_ng = int((called_ng & anomalous).sum())
    return {"rule": rule, "description": RULES[rule],
            "target_fpr": float(target_fpr) if rule == "fpr" else None,
            "image": image, "pixel": pixel, "image_score": image_score, "pool": int(pool),
            "held_out_images": {"normal": int(normal.sum()), "anomalous": int(anomalous.sum())},
            "on_held_out": {
                "image_fpr": share_at_least(scores[normal], image),
                "image_recall": share_at_least(scores[anomalous], image),
                "image_f1": float(2 * true_ng / (called_ng.sum() + anomalous.sum()))
                if anomalous.any() else None,
                "pixel_fpr_on_normal_images": share_at_least(maps[normal], pixel)},
            "chosen_on": "held-out TRAINING images with synthetic anomalies (never the test set)"}


def on_test_set(threshold, scores, labels, image_score, pool):
    """How the stored image threshold does on labelled test images: FPR on the good ones,
    recall on the anomalous ones, F1 (None where a kind of image is missing)."""
    if threshold.get("image") is None:
        return {"not_computed": "the stored threshold has no image threshold"}
    if threshold.get("image_score") != image_score or (image_score == "avgpool"
                                                       and threshold.get("pool") != pool):
        return {"not_computed": f"chosen for {threshold.get('image_score')} scores (pool "
                                f"{threshold.get('pool')}), not --image-score {image_score}"}
    labels = np.asarray(labels, dtype=bool)
    called_ng = np.asarray(scores, dtype=np.float32) >= np.float32(threshold["image"])
    true_ng = int((called_ng & labels).sum())
    return {"image": threshold["image"], "rule": threshold["rule"],
            "image_fpr": share_at_least(np.asarray(scores)[~labels], threshold["image"]),
            "image_recall": share_at_least(np.asarray(scores)[labels], threshold["image"]),
            "image_f1": (2 * true_ng / int(called_ng.sum() + labels.sum())
                         if labels.any() else None),
            "accuracy": float((called_ng == labels).mean()),
            "chosen_on": threshold.get("chosen_on")}


# ----------------------------------------------------------------------------------------
# Which weights a threshold belongs to; threshold files
# ----------------------------------------------------------------------------------------

def weights_digest(state_dict, length=16):
    """Short sha256 of a model's weights (names, shapes, dtypes and bytes): the same for
    model.pt and a copy of it, different for best.pt or another run."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:length]


def to_file(threshold, digest, checkpoint):
    """What threshold.json holds: the threshold and the weights it was chosen for."""
    return {"kind": FILE_KIND, "version": 1, "weights_digest": digest,
            "checkpoint": os.path.abspath(checkpoint), **threshold}


def read_file(path, digest, what="--threshold-file"):
    """A threshold file for the model whose weights have `digest`; one line otherwise."""
    if not os.path.isfile(path):
        raise UserError(f"{what}: file {path!r} does not exist")
    try:
        with open(path) as f:
            threshold = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: {path!r} is not readable JSON ({e})".splitlines()[0])
    if not isinstance(threshold, dict) or threshold.get("kind") != FILE_KIND:
        raise UserError(f"{what}: {path!r} is not a threshold file (threshold.json of "
                        "evaluate.py --predict)")
    if threshold.get("weights_digest") != digest:
        raise UserError(f"{what}: {path!r} was chosen for another model (weights "
                        f"{threshold.get('weights_digest')}, this checkpoint's {digest}, from "
                        f"{threshold.get('checkpoint')!r})")
    for key in ("image", "pixel"):
        value = threshold.get(key)
        if value is not None and not (isinstance(value, (int, float)) and np.isfinite(value)):
            raise UserError(f"{what}: {path!r}: {key!r} must be a finite number or null, "
                            f"got {value!r}")
    return threshold


def resolve(stored, threshold_file, pixel_override, digest, image_score, pool):
    """The threshold evaluate.py --predict decides with, and a sentence saying where it
    comes from: --threshold-file, else the one stored in the checkpoint; --threshold T
    replaces the pixel threshold. None when there is none. A threshold chosen for other
    image scores (--image-score / --pool) is refused: its numbers mean something else."""
    threshold, source = None, None
    if threshold_file:
        threshold, source = read_file(threshold_file, digest), f"--threshold-file {threshold_file}"
    elif stored:
        threshold, source = dict(stored), "stored in the checkpoint"
    if threshold is not None and threshold.get("image") is not None:
        recorded = (threshold.get("image_score"), threshold.get("pool"))
        if recorded[0] != image_score or (image_score == "avgpool" and recorded[1] != pool):
            raise UserError(f"--image-score {image_score} --pool {pool}: the threshold "
                            f"({source}) is for {recorded[0]} scores (pool {recorded[1]}); "
                            "use those or no threshold")
    if pixel_override is not None:
        threshold = dict(threshold or {"image": None}, pixel=float(pixel_override))
        source = (source + ", pixel threshold from --threshold") if source else "--threshold"
    if threshold is not None:
        threshold["source"] = source
    return threshold
