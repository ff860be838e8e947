"""Choosing the checkpoint without the test set: a share of the TRAINING images is held
out, given synthetic anomalies like the training samples, and scored with the test
metrics. (The authors choose their checkpoint on the test set; docs/method.md.)
"""

import os

import numpy as np
import torch

from . import data, metrics, runs, viz
from .cli import UserError
from .files import atomic_save_image


def split_validation(samples, fraction, seed, log=print):
    """Hold out a share of the training images (never test images) for checkpoint choice
    and calibration; a split that leaves or holds out a single image says so."""
    if fraction <= 0:
        return samples, []
    if fraction >= 1:
        raise UserError(f"--val-fraction must be below 1, got {fraction}")
    n_val = max(1, int(round(fraction * len(samples))))
    if n_val >= len(samples):
        raise UserError(
            f"--val-fraction {fraction} leaves no training images ({len(samples)} in all)"
        )
    if n_val == 1:
        log(
            f"WARNING: --val-fraction {fraction} holds out 1 of {len(samples)} training images: "
            "best.pt and the OK/NG calibration rest on that one image; hold out more"
        )
    if len(samples) - n_val == 1:
        log(
            f"WARNING: --val-fraction {fraction} leaves 1 of {len(samples)} training images to "
            "train on; hold out fewer"
        )
    rng = np.random.default_rng([seed, 7])
    held_out = set(rng.choice(len(samples), n_val, replace=False).tolist())
    return (
        [s for i, s in enumerate(samples) if i not in held_out],
        [s for i, s in enumerate(samples) if i in held_out],
    )


# Validation samples drawn from the held-out images when there are few of them. At demo scale
# 4 held-out images gave 8 samples, 4 of them anomalous: one faint draw moved the held-out
# pixel AUROC by ~0.05 (granite seed 1 read 0.845 on those 4 anomalies and 0.88 on 64 drawn
# from the same images), too coarse both to choose best.pt and to say whether the model learned.
MIN_VALIDATION_SAMPLES = 32


def make_validation_set(stream, n_images, n_samples=MIN_VALIDATION_SAMPLES):
    """Fixed samples: the first max(n_samples, 2 n) of the held-out stream (half normal, half
    with a synthetic anomaly; the stream draws its images anew each epoch with fresh
    anomalies, so a held-out image recurs with other pastes: `distinct` counts the images),
    what best.pt is chosen on; and under "normal" each held-out image once as it is, what
    calibration is fitted on."""
    items = [stream[g] for g in range(max(n_samples, 2 * n_images))]
    return {key: torch.stack([it[key] for it in items]) for key in ("image", "mask")} | {
        "anomalous": torch.tensor([it["anomalous"] for it in items]),
        "distinct": len({it["index"] for it in items}),
        "normal": torch.stack([data.to_tensor(stream.clean_image(i)) for i in range(n_images)]),
    }


@torch.no_grad()
def validation_maps(model, features, val, device, batch_size):
    """The discriminator's maps of the validation samples in eval mode, (N, S, S) numpy:
    what it was trained to produce on synthetic anomalies, so what best.pt is chosen on."""
    was_training = model.training
    model.eval()
    images = val["image"]
    maps = torch.cat(
        [
            model(features(images[i : i + batch_size].to(device)), images.shape[-2:])[
                "discriminator_map"
            ]
            .float()
            .cpu()
            for i in range(0, len(images), batch_size)
        ]
    )
    model.train(was_training)
    return maps.numpy()


def validation_metrics(maps, val):
    masks = val["mask"][:, 0].numpy()
    labels = masks.reshape(len(masks), -1).max(axis=1) > 0
    return {
        "pixel_auroc": metrics.pixel_auroc(maps, masks),
        "au_pro": metrics.au_pro(maps, masks),
        "image_auroc": metrics.image_auroc(labels, metrics.image_scores(maps)),
    }


# Below this held-out pixel AUROC (chance: 0.5) at the end of training, the model has not
# learnt to find its own synthetic anomalies: nothing downstream can be trusted, and the
# cause is upstream of the test split (the anomaly source, AFS, the training budget).
NOT_LEARNED_BELOW = 0.7


def learning_check(out):
    """The last held-out validation of a run (OUT/val.jsonl) and, when its pixel AUROC is
    near chance, one sentence saying so and what to look at. None without validation."""
    entries = runs.read_log(os.path.join(out, VAL_LOG))
    if not entries or entries[-1].get("pixel_auroc") is None:
        return None
    last = entries[-1]
    check = {"step": last["step"], "held_out_pixel_auroc": last["pixel_auroc"], "warning": None}
    if last["pixel_auroc"] < NOT_LEARNED_BELOW:
        check["warning"] = (
            f"the model did not learn to find its own synthetic anomalies on this category: "
            f"held-out pixel AUROC {last['pixel_auroc']:.2f} at step {last['step']} (chance "
            f"0.5, below {NOT_LEARNED_BELOW}); its maps and verdicts mean little. Look at "
            f"{os.path.join(out, 'learning_curve.png')} and the SDAS contact sheet "
            "(synthesize.py's preview/contact_sheet.png): are the anomalies visible?"
        )
    return check


VAL_LOG = "val.jsonl"
VAL_METRICS = {"pixel_auroc": "pixel AUROC", "au_pro": "AU-PRO", "image_auroc": "image AUROC"}
LOSSES = {
    "loss": "loss",
    "segmentation": "segmentation (CE)",
    "reconstruction": "reconstruction (MSE)",
}


def write_learning_curve(out):
    """OUT/learning_curve.png: the held-out validation metrics (top) and the training loss
    (bottom) against the step, from val.jsonl and loss.jsonl."""

    def curves(log_name, names):
        entries = runs.read_log(os.path.join(out, log_name))
        return {
            label: ([e["step"] for e in entries], [e.get(key) for e in entries])
            for key, label in names.items()
        }

    top = viz.line_chart(
        curves(VAL_LOG, VAL_METRICS),
        "validation on held-out TRAINING images with synthetic anomalies (never the test set)",
        "step",
        "metric",
        y_range=(0, 1),
    )
    bottom = viz.line_chart(curves(runs.LOG_FILE, LOSSES), "training loss", "step", "loss")
    picture = viz.to_pil(np.concatenate([top, bottom]))
    atomic_save_image(picture, os.path.join(out, "learning_curve.png"))


def validate_and_keep_best(model, features, val, held_out, step, best, args, out, save_best):
    """Validate on the held-out training images (the discriminator's map against their
    synthetic anomalies), log to val.jsonl and draw the learning curve; a better step (by
    --val-metric) is handed to save_best(step, selected_on) (train_realnet.py: best.pt).
    Returns best."""
    metric, device = args.val_metric, next(model.parameters()).device
    maps = validation_maps(model, features, val, device, args.batch_size)
    scores = validation_metrics(maps, val)
    with open(os.path.join(out, VAL_LOG), "a") as f:
        runs.log_line(f, {"step": step, **scores})
    write_learning_curve(out)
    print(
        f"validation on {len(held_out)} held-out training images at step {step}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if v is not None)
    )
    value = scores[metric]
    if value is None or (best["value"] is not None and value <= best["value"]):
        return best
    selected_on = {
        "rule": f"best {metric} on held-out TRAINING images with synthetic anomalies "
        "(never the test set)",
        "step": step,
        "scores": scores,
        "held_out_images": [s.image for s in held_out],
        "validation_samples": {
            "normal": int((~val["anomalous"]).sum()),
            "synthetic_anomaly": int(val["anomalous"].sum()),
            "distinct_images": val["distinct"],
        },
    }
    save_best(step, selected_on)
    return {"value": value, "step": step}
