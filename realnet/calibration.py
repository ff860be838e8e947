"""Calibration: what turns the model's raw outputs into an OK/NG verdict, fitted on GOOD
images only, as one step of its own (docs/method.md, "Calibration").

Training learns weights; it does not say where "normal" ends. That is measured afterwards,
on good images the model was not trained on, each used once, in the precision the model
will run in:

    map scale   (a model trained with --anomaly-map fused) per part of the map, a centre
                and a spread on normal pixels, so that every part counts in the same units
    image       an image is NG when its score (max of the 16 x 16 average-pooled map, the
                score evaluate.py reports) is >= this threshold
    pixel       the defect mask of an image is (map >= this threshold)

When it runs:
  - train_realnet.py, once after training, on the held-out normal training images
    (--val-fraction), for model.pt and best.pt, in --calibrate-precision (fp32 by default,
    what evaluate.py runs). The result is stored in the checkpoint (`calibration`).
  - later, on a folder of good images the user brings (a plant collects far more good images
    after training than were held out):

        python3 -m realnet.calibration --checkpoint runs/x/realnet/best.pt --good good_images/

    This writes a calibration file (JSON) beside the checkpoint, never over an earlier one,
    tied to the weights by their digest; `evaluate.py --calibration FILE` uses it.

The image threshold's rule (--threshold-rule):
    normal  (default) the good images' range and a margin of it again: from a typical
            normal pixel (the median of the map over the good images' pixels) to the
            highest good image score is their range; the threshold lies margin ranges above
            that highest score, margin = MARGIN_IMAGES / (n + 1) for n good images (0.6 for
            the demo's 4). No synthetic anomaly is involved. With n good images a new good
            image exceeds their highest score with probability about 1 / (n + 1)
            (exchangeability), and how far past it good images reach shrinks like 1 / (n + 1)
            of their range: a handful of images needs a large margin, a plant's hundreds
            almost none (chosen on the demo's washer and granite, docs/method.md). A
            calibration on fewer than ENOUGH_IMAGES good images says so in one line.
    fpr     the lowest threshold that calls at most --target-fpr of the good images NG
            (with n images an FPR below 1/n cannot be resolved: it becomes their maximum)
    f1      F1-optimal between the good held-out images and the same images with a
            synthetic anomaly (train_realnet.py only). Synthetic anomalies are far easier
            than real defects, so this threshold sits high above the good images: kept for
            comparison, not the default.
The pixel threshold is the image threshold: an image called NG always has a non-empty mask,
and the mask shows where the map reaches the level that made it NG.
"""

import argparse
import datetime
import hashlib
import json
import os

import numpy as np
import torch

from . import cli, data, metrics, precision as precisions
from .cli import UserError
from .files import atomic_write_json

KIND = "realnet_calibration"
RULES = {
    "normal": "the highest score of the good calibration images, raised by "
    "MARGIN_IMAGES / (n + 1) times its height above a typical normal pixel",
    "fpr": "at most the target false-positive rate on the good calibration images",
    "f1": "F1-optimal on held-out good images vs the same images with synthetic anomalies",
}
DEFAULT_RULE = "normal"
# The "normal" rule's margin, in ranges above the highest of n good scores, is
# MARGIN_IMAGES / (n + 1): 0.6 for the demo's 4 held-out images (chosen on washer and
# granite), 0.14 for 20 (checked on washer and granite, benchmarks/recalibration.py)
MARGIN_IMAGES = 3.0
ENOUGH_IMAGES = 20  # good images below which a calibration says it rests on too few
SCALE_QUANTILE = 0.99  # the fused map's spread: this quantile of a part's normal pixels
RELATIVE_FLOOR = 1e-3  # a spread below this share of a part's typical size: the part is constant
# the model buffers calibration sets (not weights: the weights' digest leaves them out), and
# those it set before it was a step of its own (realnet/inference.py LEGACY_BUFFERS)
CALIBRATION_BUFFERS = ("map_centre", "map_scale", "map_weight", "map_mean", "map_std")


# ----------------------------------------------------------------------------------------
# The fused map's scale
# ----------------------------------------------------------------------------------------


def fit_map_scale(normal_pixels, names):
    """Per part of the fused map, from a sample of its values on normal pixels (P, N):
    centre = median, scale = the SCALE_QUANTILE quantile minus the median. A quantile and
    not the standard deviation: a part that is almost constant on normal pixels and
    tail-heavy elsewhere (the discriminator's probability: ~0 on normal pixels, 1 on an
    anomaly) would otherwise be divided by a tiny std and outweigh every other part.
    A part whose scale is below RELATIVE_FLOOR of its typical size (or zero) carries no
    information on normal images: it is dropped (weight 0) with a warning in `notes`."""
    centre, scale, weight, notes = [], [], [], []
    for name, values in zip(names, np.asarray(normal_pixels, dtype=np.float64)):
        median = float(np.median(values))
        spread = float(np.quantile(values, SCALE_QUANTILE) - median)
        typical = float(np.quantile(np.abs(values), SCALE_QUANTILE))
        if not np.isfinite(spread) or spread <= RELATIVE_FLOOR * max(typical, 1e-30):
            notes.append(
                f"the part '{name}' is constant on the good images (spread "
                f"{spread:.3g}): dropped from the fused map"
            )
            centre.append(median), scale.append(1.0), weight.append(0.0)
            continue
        centre.append(median), scale.append(spread), weight.append(1.0)
    if not any(weight):
        raise UserError(
            "every part of the fused map is constant on the good images: the "
            "model cannot tell anything apart; check the images and the training"
        )
    return {
        "parts": list(names),
        "centre": centre,
        "scale": scale,
        "weight": weight,
        "notes": notes,
    }


def set_map_scale(model, scale):
    """Write a fitted (or stored) scale into the model's buffers (its fused map uses them)."""
    for key, buffer in (
        ("centre", model.map_centre),
        ("scale", model.map_scale),
        ("weight", model.map_weight),
    ):
        buffer.copy_(torch.tensor(scale[key], dtype=buffer.dtype))


def pixel_sample(parts, per_image, seed):
    """A fixed random subset of each image's pixels, (P, N * per_image): what the scale is
    fitted on, so that memory stays bounded by the sample, not by the calibration set."""
    n, p = parts.shape[0], parts.shape[1]
    flat = parts.reshape(n, p, -1)
    rng = np.random.default_rng(seed)
    picks = [
        flat[i][:, rng.choice(flat.shape[-1], min(per_image, flat.shape[-1]), replace=False)]
        for i in range(n)
    ]
    return np.concatenate(picks, axis=1)


# ----------------------------------------------------------------------------------------
# Thresholds
# ----------------------------------------------------------------------------------------


def fpr_threshold(normal_values, target_fpr):
    """The lowest t such that at most floor(target_fpr * n) of the n normal values are
    >= t (what `value >= t` would call NG): just above the (k+1)-th largest value."""
    values = np.sort(np.asarray(normal_values, dtype=np.float32).ravel())[::-1]
    allowed = int(np.floor(target_fpr * len(values)))
    if allowed >= len(values):
        return float(values[-1])
    return float(np.nextafter(values[allowed], np.float32(np.inf)))


def normal_margin(count):
    """The "normal" rule's margin for `count` good images: MARGIN_IMAGES / (count + 1)."""
    return MARGIN_IMAGES / (count + 1)


def normal_threshold(normal_scores, typical_pixel, margin=None):
    """The highest good score, raised by `margin` (default: normal_margin of their count)
    times its height above a typical normal pixel (the median of the map over the good
    images): max + margin (max - typical)."""
    if margin is None:
        margin = normal_margin(len(normal_scores))
    highest = float(np.max(normal_scores))
    return float(np.float32(highest + margin * max(highest - typical_pixel, 0.0)))


def share_at_least(values, threshold):
    values = np.asarray(values, dtype=np.float32)
    return float((values >= np.float32(threshold)).mean()) if values.size else None


def image_threshold(
    rule, normal_scores, typical_pixel=0.0, target_fpr=0.01, anomalous_scores=None
):
    """The image threshold by `rule` (see the module docstring)."""
    if rule == "normal":
        return normal_threshold(normal_scores, typical_pixel)
    if rule == "fpr":
        return fpr_threshold(normal_scores, target_fpr)
    if rule == "f1":
        if anomalous_scores is None or not len(anomalous_scores):
            raise UserError(
                "--threshold-rule f1 needs images with synthetic anomalies (only "
                "train_realnet.py has them); use normal or fpr"
            )
        scores = np.concatenate([normal_scores, anomalous_scores])
        labels = np.r_[np.zeros(len(normal_scores)), np.ones(len(anomalous_scores))]
        return metrics.f1_optimal_threshold(scores, labels)[0]
    raise ValueError(f"unknown threshold rule {rule!r}; expected one of {sorted(RULES)}")


# ----------------------------------------------------------------------------------------
# Running the model on good images
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def _outputs(model, features, batches, device, key):
    for images in batches:
        yield model(features(images.to(device)), images.shape[-2:])[key].float().cpu()


def calibrate(
    model,
    features,
    good_batches,
    device,
    rule=DEFAULT_RULE,
    target_fpr=0.01,
    precision="fp32",
    anomalous_batches=None,
    pool=16,
    source="",
    seed=0,
):
    """Fit the calibration of `model` (in eval mode, in `precision`) on good images.
    `good_batches`: a function returning an iterable of image batches (B, 3, S, S),
    ImageNet-normalised, each good image once (called twice for a fused map: once to fit the
    scale, once to score with it). `anomalous_batches` likewise, only for rule f1.
    Sets the model's map scale and returns the calibration record (plain types)."""
    model.eval()
    amp = precisions.autocast(precision, device)
    scale = None
    if model.fused:
        with amp:
            sample = np.concatenate(
                [
                    pixel_sample(parts.numpy(), 4096, seed + i)
                    for i, parts in enumerate(
                        _outputs(model, features, good_batches(), device, "map_parts")
                    )
                ],
                axis=1,
            )
        scale = fit_map_scale(sample, model.part_names())
        set_map_scale(model, scale)
    with amp:
        scores, pixels, count = [], [], 0
        for maps in _outputs(model, features, good_batches(), device, "anomaly_map"):
            scores.append(metrics.image_scores(maps.numpy(), pool=pool))
            pixels.append(pixel_sample(maps.numpy()[:, None], 4096, seed + count)[0])
            count += len(maps)
        anomalous = None
        if anomalous_batches is not None:
            anomalous = np.concatenate(
                [
                    metrics.image_scores(m.numpy(), pool=pool)
                    for m in _outputs(model, features, anomalous_batches(), device, "anomaly_map")
                ]
            )
    scores, typical = np.concatenate(scores), float(np.median(np.concatenate(pixels)))
    threshold = image_threshold(rule, scores, typical, target_fpr, anomalous)
    notes = list(scale["notes"]) if scale else []
    if count < ENOUGH_IMAGES:
        notes.append(too_few_images(count))
    record = {
        "kind": KIND,
        "version": 1,
        "weights_digest": weights_digest(model.state_dict()),
        "rule": rule,
        "description": RULES[rule],
        "target_fpr": float(target_fpr) if rule == "fpr" else None,
        "margin": normal_margin(count) if rule == "normal" else None,
        "image": threshold,
        "pixel": threshold,
        "set_by": "calibration",
        "fitted": {"image": threshold, "pixel": threshold},
        "image_score": "avgpool",
        "pool": int(pool),
        "precision": precision,
        "map_scale": scale,
        "good_images": count,
        "source": source,
        "good_scores": {
            "min": float(scores.min()),
            "median": float(np.median(scores)),
            "max": float(scores.max()),
            "typical_pixel": typical,
        },
        "on_good_images": {"image_fpr": share_at_least(scores, threshold)},
        "notes": notes,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if anomalous is not None:
        record["on_good_images"]["synthetic_recall"] = share_at_least(anomalous, threshold)
        if rule == "f1" and record["on_good_images"]["image_fpr"] == 1.0:
            notes.append(
                "the f1 rule called every good held-out image NG: its threshold is "
                "below them all; use --threshold-rule normal"
            )
    return record


def calibrate_checkpoints(out, config, features, val, args, device):
    """Calibration, once training is over (realnet/calibration.py): model.pt and best.pt
    each get the fused map's scale and the OK/NG thresholds of their own weights, fitted on
    the held-out normal images (each once) in --calibrate-precision. Returns {file name:
    calibration record}. `val`: validation.make_validation_set's samples; `args`:
    train_realnet.py's (--batch-size, --threshold-rule, --target-fpr, --val-fraction)."""
    from .features import FeatureExtractor  # the model's modules import this one
    from .files import atomic_torch_save, load_checkpoint
    from .model import RealNet
    from .validation import learning_check

    batch_size, rule, target_fpr = args.batch_size, args.threshold_rule, args.target_fpr
    run_precision, val_fraction = args.calibrate_precision, args.val_fraction

    def good():  # the held-out images as they are, each once
        return (
            val["normal"][i : i + batch_size] for i in range(0, len(val["normal"]), batch_size)
        )

    def synthetic():  # for rule f1 only: the held-out samples with a synthetic anomaly
        images = val["image"][val["anomalous"]]
        return (images[i : i + batch_size] for i in range(0, len(images), batch_size))

    records, learned = {}, learning_check(out)
    for name in ("best.pt", "model.pt"):
        path = os.path.join(out, name)
        if not os.path.exists(path):
            continue
        checkpoint = load_checkpoint(path, name, kind="realnet")
        model = RealNet(config).to(device)
        model.load_state_dict(checkpoint["state_dict"])
        record = calibrate(
            model,
            FeatureExtractor(features.backbone, model),
            good,
            device,
            rule,
            target_fpr,
            run_precision,
            synthetic if rule == "f1" else None,
            source=f"{len(val['normal'])} held-out TRAINING images of --val-fraction "
            f"{val_fraction} (never the test set)",
        )
        checkpoint["state_dict"] = model.state_dict()
        checkpoint["calibration"], checkpoint["learning_check"] = record, learned
        atomic_torch_save(checkpoint, path)
        records[name] = record
    return records


def report(records, validated, warning=None, log=print):
    """The end of train_realnet.py: each checkpoint's calibration (best.pt first: what the
    README evaluates), their notes, and whether the model learned its synthetic anomalies."""
    if not records:
        log(
            "not calibrated: "
            + ("no held-out image" if validated else "give --val-fraction > 0 (held-out images)")
            + "; no OK/NG threshold stored (python3 -m realnet.calibration makes one)"
        )
    for name, record in records.items():
        log(f"{name}: {describe(record)}")
    for note in dict.fromkeys(n for record in records.values() for n in record["notes"]):
        log("note: " + note)
    if warning:
        log("WARNING: " + warning)


def too_few_images(count):
    return (
        f"the OK/NG threshold rests on {count} good image(s): expect about 1 in "
        f"{count + 1} new good images or more to be called NG; collect at least "
        f"{ENOUGH_IMAGES} good images the model was not trained on and recalibrate "
        "(python3 -m realnet.calibration --checkpoint CKPT --good FOLDER)"
    )


def describe(record):
    """One line: the thresholds, how they were made, on how many good images."""
    if record is None:
        return "not calibrated"
    if record.get("set_by") == "calibration":
        rule = record["rule"] + (f" {record['target_fpr']}" if record.get("target_fpr") else "")
        how = f"rule {rule}, on {record['good_images']} good image(s), {record['precision']}"
    else:
        how = "set by hand"
    value = lambda v: "none" if v is None else f"{v:.4g}"
    return (
        f"OK/NG: image score >= {value(record['image'])} is NG; mask: map >= "
        f"{value(record['pixel'])} ({how})"
    )


# ----------------------------------------------------------------------------------------
# Which weights a calibration belongs to; calibration files
# ----------------------------------------------------------------------------------------


def weights_digest(state_dict, length=16):
    """Short sha256 of a model's weights (names, shapes, dtypes and bytes), without the
    buffers calibration sets: the same for model.pt, a copy of it and any recalibration of
    it, different for best.pt or another run."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        if name in CALIBRATION_BUFFERS:
            continue
        tensor = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:length]


def read_file(path, digest, fused, what="--calibration"):
    """A calibration file for the model whose weights have `digest`; one line otherwise.
    Thresholds edited by hand (they differ from the fitted ones) are marked set_by 'hand'."""
    if not os.path.isfile(path):
        raise UserError(f"{what}: file {path!r} does not exist")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: {path!r} is not readable JSON ({e})".splitlines()[0])
    if not isinstance(record, dict) or record.get("kind") != KIND:
        raise UserError(
            f"{what}: {path!r} is not a calibration file (written by "
            "python3 -m realnet.calibration or evaluate.py --predict)"
        )
    if record.get("weights_digest") != digest:
        raise UserError(
            f"{what}: {path!r} was made for other weights (digest "
            f"{record.get('weights_digest')}, this checkpoint's {digest})"
        )
    for key in ("image", "pixel"):
        value = record.get(key)
        if value is not None and not (isinstance(value, (int, float)) and np.isfinite(value)):
            raise UserError(
                f"{what}: {path!r}: {key!r} must be a finite number or null, got {value!r}"
            )
    if fused and not record.get("map_scale"):
        raise UserError(
            f"{what}: {path!r} has no map scale, which this model's fused map "
            "needs; make one with python3 -m realnet.calibration"
        )
    fitted = record.get("fitted") or {}
    if any(record.get(k) != fitted.get(k) for k in ("image", "pixel")):
        record["set_by"] = "hand"
    return record


def resolve(
    stored,
    calibration_file,
    image_override,
    pixel_override,
    digest,
    fused,
    image_score,
    pool,
    run_precision,
):
    """The calibration evaluate.py decides with, and where it comes from: --calibration
    FILE, else the one stored in the checkpoint; --image-threshold / --pixel-threshold
    replace a threshold (recorded as set by hand). None without any. Refused in one line:
    a calibration for other image scores, or made in another precision than this run's
    (its numbers would mean something else)."""
    record, source = None, None
    if calibration_file:
        record = read_file(calibration_file, digest, fused)
        source = f"--calibration {calibration_file}"
    elif stored:
        record, source = dict(stored), "stored in the checkpoint"
    if record is not None:
        if record.get("image_score") != image_score or (
            image_score == "avgpool" and record.get("pool") != pool
        ):
            raise UserError(
                f"--image-score {image_score} --pool {pool}: the calibration "
                f"({source}) is for {record.get('image_score')} scores (pool "
                f"{record.get('pool')}); use those"
            )
        if record.get("precision") != run_precision:
            raise UserError(
                f"--precision {run_precision}: the calibration ({source}) was "
                f"fitted in {record.get('precision')}, and the map's numbers "
                f"differ between precisions; run in {record.get('precision')} or "
                f"recalibrate in {run_precision} (python3 -m realnet.calibration "
                f"--precision {run_precision})"
            )
    elif fused:
        raise UserError(
            "this model's fused map is not calibrated (its training stopped "
            "before calibration, or it predates it): python3 -m "
            "realnet.calibration --checkpoint CKPT --good FOLDER"
        )
    for key, value in (("image", image_override), ("pixel", pixel_override)):
        if value is not None:
            record = dict(
                record
                or {
                    "kind": KIND,
                    "version": 1,
                    "weights_digest": digest,
                    "image": None,
                    "pixel": None,
                    "image_score": image_score,
                    "pool": pool,
                    "precision": run_precision,
                    "map_scale": None,
                }
            )
            record[key], record["set_by"] = float(value), "hand"
            source = (source + ", " if source else "") + f"--{key}-threshold"
    if record is not None:
        record["used_from"] = source
    return record


def for_run(
    model,
    stored,
    calibration_file,
    image_override,
    pixel_override,
    image_score,
    pool,
    run_precision,
    log=print,
):
    """The calibration a run of evaluate.py decides with (resolve), its map scale put into
    the model; prints what it is and what it rests on. None: no calibration."""
    calibrated = resolve(
        stored,
        calibration_file,
        image_override,
        pixel_override,
        weights_digest(model.state_dict()),
        model.fused,
        image_score,
        pool,
        run_precision,
    )
    if calibrated is None:
        return None
    if calibrated.get("map_scale"):
        set_map_scale(model, calibrated["map_scale"])
    log(describe(calibrated) + f" [{calibrated['used_from']}]")
    for note in calibrated.get("notes") or []:
        log("note: " + note)
    return calibrated


def on_test_set(record, scores, labels):
    """How the calibration's image threshold does on labelled test images: FPR on the good
    ones, recall on the defective ones, balanced accuracy, and the best balanced accuracy any
    single threshold reaches on this split (what a perfectly placed threshold would give)."""
    if record is None or record.get("image") is None:
        return {"not_computed": "no image threshold"}
    scores, labels = np.asarray(scores, dtype=np.float32), np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return {"not_computed": "needs good and defective test images"}
    called_ng = scores >= np.float32(record["image"])
    fpr, recall = float(called_ng[~labels].mean()), float(called_ng[labels].mean())
    return {
        "image": record["image"],
        "rule": record.get("rule"),
        "set_by": record.get("set_by"),
        "image_fpr": fpr,
        "image_recall": recall,
        "balanced_accuracy": (recall + 1 - fpr) / 2,
        "best_balanced_accuracy": best_balanced_accuracy(scores, labels),
    }


def best_balanced_accuracy(scores, labels):
    """The highest balanced accuracy of `score >= t` over every threshold t."""
    best = 0.5
    for t in np.unique(scores):
        called = scores >= t
        best = max(best, (called[labels].mean() + 1 - called[~labels].mean()) / 2)
    return float(best)


# ----------------------------------------------------------------------------------------
# python3 -m realnet.calibration: recalibrate a trained model on good images
# ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python3 -m realnet.calibration",
        description="Recalibrate a trained RealNet on a folder of good images: the fused map's "
        "scale and the OK/NG thresholds, written to a new calibration file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="model.pt or best.pt of train_realnet.py")
    p.add_argument(
        "--good",
        required=True,
        help="a folder of GOOD images the model was not trained on (each used once)",
    )
    p.add_argument(
        "--threshold-rule",
        default=DEFAULT_RULE,
        choices=["normal", "fpr"],
        help="normal: the highest good score plus a margin | fpr: --target-fpr",
    )
    p.add_argument(
        "--target-fpr",
        type=float,
        default=0.01,
        help="with --threshold-rule fpr: the share of good images allowed NG",
    )
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    precisions.add_precision_arg(p, "the networks (the precision evaluate.py will run in)")
    p.add_argument(
        "--backbone-weights",
        default=None,
        help="imagenet | PATH.pth | random (default: the checkpoint's)",
    )
    cli.add_device_arg(p)
    p.add_argument(
        "--out",
        default=None,
        help="the calibration file to write (default: <checkpoint folder>/"
        "calibration_<checkpoint name>_<UTC time>.json); never overwritten",
    )
    return p.parse_args(argv)


def main(argv=None):
    from .inference import load_model  # the model and its backbone, as evaluate.py loads them

    args = parse_args(argv)
    cli.require_positive(batch_size=args.batch_size)
    if not 0 <= args.target_fpr < 1:
        raise UserError(f"--target-fpr must be in [0, 1), got {args.target_fpr}")
    folder = cli.require_dir(args.good, "--good")
    paths = data.list_images(folder)
    if not paths:
        raise UserError(
            f"--good: folder {folder!r} has no images ({', '.join(data.IMAGE_EXTENSIONS)})"
        )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = os.path.splitext(os.path.basename(args.checkpoint))[0]
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(args.checkpoint)), f"calibration_{name}_{stamp}.json"
    )
    if os.path.exists(out):
        raise UserError(
            f"--out {out!r} exists: a calibration is never replaced; choose another --out"
        )
    device = cli.resolve_device(args.device)
    precisions.check_precision(args.precision, device)
    model, features, _ = load_model(args.checkpoint, args.backbone_weights, device)
    size = model.config["input_size"]

    def batches():
        for i in range(0, len(paths), args.batch_size):
            yield torch.stack(
                [data.to_tensor(data.load_image(p, size)) for p in paths[i : i + args.batch_size]]
            )

    record = calibrate(
        model,
        features,
        batches,
        device,
        args.threshold_rule,
        args.target_fpr,
        args.precision,
        source=f"--good {os.path.abspath(folder)}",
    )
    record["checkpoint"] = os.path.abspath(args.checkpoint)
    atomic_write_json(out, record)
    print(describe(record))
    for note in record["notes"]:
        print("note: " + note)
    print(
        f"wrote {out}; use it with evaluate.py --checkpoint {args.checkpoint} --calibration {out}"
    )


if __name__ == "__main__":
    cli.run(main)
