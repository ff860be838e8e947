"""Stage 5: evaluate a RealNet checkpoint, honestly (docs/method.md, "Evaluation").

    python3 evaluate.py --checkpoint runs/bottle/realnet/model.pt --data data/mvtec
    python3 evaluate.py --checkpoint runs/demo/realnet/model.pt   # on the data it was trained for
    python3 evaluate.py --checkpoint runs/demo/realnet/model.pt --predict my_images/   # no labels
    python3 evaluate.py --checkpoint runs/demo/realnet/model.pt --export model.pt2     # deploy

The anomaly map is the one the checkpoint reports (train_realnet.py --anomaly-map): the
discriminator's probability (the paper), or the fused map, in calibrated units.
Metrics, per category (and their mean for a unified model):
  image AUROC   score = max of the 16x16 average-pooled anomaly map (the authors' choice;
                --image-score max for the plain maximum)
  pixel AUROC   over all pixels of all test images
  AU-PRO        MVTec AD's exact definition up to FPR 0.3 (realnet/metrics.py)
and per defect type (that defect's images with all good images). No AUROC is ever flipped,
the checkpoint is whatever train_realnet.py chose WITHOUT the test set. The OK/NG
thresholds and the fused map's scale are the checkpoint's calibration (fitted on good
held-out training images after training, realnet/calibration.py), or those of
--calibration FILE (python3 -m realnet.calibration). The contour in the pictures is the
calibrated pixel threshold; a checkpoint without one gets the F1-optimal pixel threshold of
the test set, for the pictures only (they say which). No AUROC or AU-PRO depends on a
threshold; metrics.json adds how the calibrated image threshold does on the test set
(calibration_on_test: FPR, recall, balanced accuracy and the best any threshold reaches).
Throughput: images/s of the model's forward (backbone, AFS, reconstruction, RRS,
discriminator; no data loading), device synchronised, batch and device stated.

Writes to --out (default: <checkpoint folder>/eval): metrics.json, scores.csv (category,
path, defect, label, score, decision: OK / NG by the calibrated image threshold, empty
without one) and panels/<category>/<defect>_<name>.png (image | ground truth | anomaly map with the
contour).

What came after the paper lives in the package: --predict DIR scores a production lot into
a folder of its own (realnet/predict.py says every file it writes); --export PATH writes
the whole model, uint8 images to score, map and verdict, as torch.export programs
(realnet/export.py); nothing else is run with either.
"""

import argparse
import os

import numpy as np
import torch

from realnet import calibration, cli, data, export, metrics, precision, predict, runs, throughput
from realnet.files import atomic_write_csv, atomic_write_json, file_digest, prepare_output_folder
from realnet.inference import dataset_maps, load_model
from realnet.model import describe
from realnet.panels import picture_threshold, write_panels

# The protocol's defaults (flags below); benchmarks/stage_maps.py scores with the same ones
IMAGE_SCORE, POOL, FPR_LIMIT = "avgpool", 16, 0.3


def parse_args(argv=None):
    # fmt: off
    # (a table of flags: one per line, continuation lines aligned under the help text)
    p = argparse.ArgumentParser(
        description="Stage 5: evaluate RealNet (image/pixel AUROC, exact AU-PRO).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = p.add_argument
    add("--checkpoint", required=True, help="model.pt or best.pt from train_realnet.py")
    cli.add_data_args(p, default=None, help="data set root (default: the one the checkpoint was "
                                            "trained on)")
    add("--categories", default=None, help="comma-separated (default: the checkpoint's)")
    add("--backbone-weights", default=None, help="imagenet | PATH.pth | random (default: the "
                                                 "weights the checkpoint was trained with)")
    add("--image-score", default=IMAGE_SCORE, choices=["avgpool", "max"],
        help="avgpool: max of the pooled map (authors); max: max of the map (MVTec's script)")
    add("--pool", type=int, default=POOL, help="average-pooling window of --image-score avgpool")
    add("--fpr-limit", type=float, default=FPR_LIMIT, help="AU-PRO integration limit (MVTec AD)")
    add("--batch-size", type=int, default=16, help="test batch size, also the throughput batch")
    add("--throughput-repeats", type=int, default=5, help="timed forward passes (after 2 "
                                                          "warm-up)")
    add("--throughput", action="store_true", help="with --predict: also time the forward pass "
                                                  "alone on the lot's first batch "
                                                  "(throughput.json in the lot; evaluation "
                                                  "always reports it)")
    add("--panels", type=int, default=-1, help="heatmap panels per category (-1 all, 0 none)")
    add("--predict", default=None, help="score the images of this folder (no labels needed) "
                                        "into a lot folder of its own (realnet/predict.py)")
    add("--stop-on-unreadable", action="store_true", help="with --predict: stop at the first "
                                                          "image that cannot be read (default: "
                                                          "skip it and list it in the lot's "
                                                          "skipped.csv)")
    add("--calibration", default=None, help="the calibration file to use (python3 -m "
                                            "realnet.calibration, or the calibration.json of "
                                            "an earlier lot; default: the checkpoint's)")
    add("--image-threshold", type=float, default=None, help="with --predict: NG when the image "
                                                            "score is >= this (replaces the "
                                                            "calibrated one; recorded as set "
                                                            "by hand)")
    add("--pixel-threshold", type=float, default=None, help="with --predict: the masks and the "
                                                            "contour are map >= this (replaces "
                                                            "the calibrated one; recorded as "
                                                            "set by hand)")
    add("--export", default=None, help="only export the whole model (uint8 images of any size -> "
                                       "score, map at the input's size, OK/NG) as torch.export "
                                       "programs: PATH.pt2 and PATH's reference-RRS variant, "
                                       "described in PATH's .export.json, checked against "
                                       "--predict's pipeline on the first --batch-size test "
                                       "images (--predict DIR's if given); realnet/export.py")
    cli.add_workers_arg(p)
    precision.add_precision_arg(p, "the backbone, UNets and discriminator (maps stay float32)")
    cli.add_device_arg(p)
    add("--out", default=None, help="output folder (default <checkpoint folder>/eval); with "
                                    "--predict the lot's own folder, new or empty (default "
                                    "<checkpoint folder>/predict/<DIR's name>-<time>)")
    # fmt: on
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------


def evaluate_category(args, model, features, calibrated, device, dataset, category, out):
    """One category's test split: its metrics (all images, then each defect type with the
    good ones), its rows of scores.csv and its heatmap panels (--panels)."""
    samples = dataset.test(category)
    if not samples:
        raise cli.UserError(f"{dataset.root!r}: category {category!r} has no test images")
    size = model.config["input_size"]
    test_set = data.TestSet(samples, size)
    maps, masks = dataset_maps(
        model, features, test_set, device, args.batch_size, args.workers, f"eval {category}"
    )
    labels = np.array([s.label for s in samples], dtype=bool)
    has_masks = np.array([s.mask is not None for s in samples if s.label == 1], dtype=bool)
    scores = metrics.score_images(maps, args.image_score, args.pool)

    result, missing = metrics.compute_metrics(
        maps, masks, labels, has_masks, scores, args.fpr_limit
    )
    per_defect = metrics.per_defect_metrics(samples, maps, masks, scores, args.fpr_limit)
    picture = picture_threshold(calibrated, maps, masks, labels, has_masks)
    result.update(
        {
            "images": len(samples),
            "good": int((~labels).sum()),
            "anomalous": int(labels.sum()),
            "per_defect": per_defect,
            "picture_threshold": picture,
        }
    )
    if calibrated:
        result["calibration_on_test"] = calibration.on_test_set(calibrated, scores, labels)
    if missing:
        result["not_computed"] = missing
        for name, why in missing.items():
            print(f"{category}: {name} not computed: {why}")

    image_threshold = calibrated and calibrated.get("image")
    rows_csv = [
        (category, s.image, s.defect, s.label, float(sc), predict.decide(sc, image_threshold))
        for s, sc in zip(samples, scores)
    ]
    if args.panels:
        write_panels(
            samples,
            maps,
            masks,
            scores,
            picture["value"],
            picture["note"],
            size,
            os.path.join(out, "panels", category),
            args.panels,
            probability=not model.fused,
        )
    return result, rows_csv


# ----------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------


def print_table(results, summary):
    fmt = lambda v: "  n/a " if v is None else f"{100 * v:6.2f}"
    print(f"{'category':<16} {'image':>6} {'pixel':>6} {'AU-PRO':>6}")
    rows = list(results.items()) + ([("mean", summary)] if len(results) > 1 else [])
    for name, r in rows:
        print(f"{name:<16} {fmt(r['image_auroc'])} {fmt(r['pixel_auroc'])} {fmt(r['au_pro'])}")


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def check_args(args):
    """One-line errors for values that cannot work and for flags that would be ignored."""
    cli.require_positive(batch_size=args.batch_size, throughput_repeats=args.throughput_repeats)
    cli.require_non_negative(workers=args.workers)
    if args.panels < -1:
        raise cli.UserError(f"--panels must be -1 (all), 0 (none) or a count (got {args.panels})")
    if not 0 < args.fpr_limit <= 1:
        raise cli.UserError(f"--fpr-limit must be in (0, 1], got {args.fpr_limit}")
    cli.refuse_ignored(args, "format", "auto", "data", "it gives the layout of --data")
    cli.refuse_ignored(args, "image_threshold", None, "predict", "it decides OK/NG of its images")
    cli.refuse_ignored(args, "pixel_threshold", None, "predict", "the threshold of its masks")
    cli.refuse_ignored(args, "throughput", False, "predict", "evaluation always times the model")
    cli.refuse_ignored(args, "stop_on_unreadable", False, "predict", "it is about a lot's images")
    if args.export and args.precision != "fp32":
        raise cli.UserError(
            f"--precision {args.precision} with --export: the exported program is "
            "float32 (run it under torch.autocast to lower its precision)"
        )
    if args.export and args.out is not None:
        raise cli.UserError(
            f"--out {args.out} has no effect with --export (the programs and "
            "their description file are written beside --export PATH)"
        )
    if args.predict:  # it scores a folder; flags of the labelled test split would be ignored
        for name, default in (("data", None), ("categories", None), ("fpr_limit", FPR_LIMIT)):
            if getattr(args, name) != default:
                raise cli.UserError(
                    f"{cli.flag(name)} {getattr(args, name)} has no effect with "
                    f"--predict (it scores the images of {args.predict!r}, "
                    "without labels; leave out --predict to evaluate a test split)"
                )


def check_pool(pool, image_score, input_size):
    if image_score == "avgpool" and not 1 <= pool <= input_size:
        raise cli.UserError(
            f"--pool {pool}: expected a window of 1 to {input_size} pixels "
            f"(the checkpoint's input size)"
        )


def evaluate_test_set(args, model, features, ckpt, calibrated, device):
    """The test split of every category: metrics.json, scores.csv, panels/ in --out."""
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
    prepare_output_folder(
        out, files=("metrics.json", "scores.csv", "args.json"), subfolders=("panels",)
    )
    dataset = data.open_recorded_dataset(
        args.data, args.format, ckpt.get("dataset"), f"--checkpoint {args.checkpoint!r}"
    )
    categories = cli.parse_list(args.categories) if args.categories else ckpt["categories"]
    for category in categories:  # a missing mask or category: refused before any output
        dataset.test(category)
    results, rows = {}, []
    for category in categories:
        results[category], category_rows = evaluate_category(
            args, model, features, calibrated, device, dataset, category, out
        )
        rows += category_rows

    size = model.config["input_size"]
    first = data.TestSet(dataset.test(categories[0])[: args.batch_size], size)
    images = torch.stack([first[i]["image"] for i in range(len(first))]).to(device)
    speed = throughput.measure(model, features, images, args.throughput_repeats)

    summary = metrics.mean_over_categories(results)
    learned = ckpt.get("learning_check") or {}
    anomaly_map = model.config.get("anomaly_map", "discriminator")
    atomic_write_json(
        os.path.join(out, "metrics.json"),
        {
            "learning_check": learned or None,
            "checkpoint": {
                "path": os.path.abspath(args.checkpoint),
                "digest": file_digest(args.checkpoint),
                "step": ckpt.get("step"),
                "selected_on": ckpt.get("selected_on"),
                "unified": ckpt.get("unified", False),
            },
            "data": dataset.describe(),
            "categories": results,
            "mean": summary,
            "throughput": speed,
            "protocol": metrics.protocol(
                args.image_score, args.pool, args.fpr_limit, size, anomaly_map
            ),
            "args": cli.args_to_dict(args),
        },
    )
    atomic_write_csv(
        os.path.join(out, "scores.csv"),
        ["category", "path", "defect", "label", "score", "decision"],
        rows,
    )
    runs.save_args(args, out)  # with the files it describes, not before: a failed run keeps both
    print_table(results, summary)
    print(
        f"throughput {speed['images_per_s']} images/s (batch {speed['batch']}, "
        f"{speed['device']}); wrote {os.path.join(out, 'metrics.json')}, scores.csv, panels/"
    )
    if learned.get("warning"):  # beside the metrics: they rest on a model that did not learn
        print("WARNING: " + learned["warning"])


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    if args.export:  # before the model is loaded: a bad path costs nothing
        export.check_destination(args.export)
    device = cli.resolve_device(args.device)
    precision.check_precision(args.precision, device)
    model, features, ckpt = load_model(args.checkpoint, args.backbone_weights, device)
    check_pool(args.pool, args.image_score, model.config["input_size"])
    print(describe(model.config))
    calibrated = calibration.for_run(  # the fused map's scale goes into the model
        model,
        ckpt.get("calibration"),
        args.calibration,
        args.image_threshold,
        args.pixel_threshold,
        args.image_score,
        args.pool,
        args.precision,
    )
    if args.export:
        export.export_model(args, model, features, ckpt, calibrated)
        return
    with precision.autocast(args.precision, device):  # the networks' arithmetic
        if args.predict:
            predict.predict_folder(args, model, features, calibrated, device)
            return
        evaluate_test_set(args, model, features, ckpt, calibrated, device)


if __name__ == "__main__":
    cli.run(main)
