"""Stage 5: evaluate a RealNet checkpoint, honestly (docs/method.md, "Evaluation").

    python3 evaluate.py --checkpoint runs/bottle/realnet/model.pt --data data/mvtec
    python3 evaluate.py --checkpoint runs/demo/realnet/model.pt       # on the data it was trained for
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
from realnet.model import ANOMALY_MAPS, describe
from realnet.panels import picture_threshold, write_panels

# The protocol's defaults (flags below); benchmarks/stage_maps.py scores with the same ones
IMAGE_SCORE, POOL, FPR_LIMIT = "avgpool", 16, 0.3


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stage 5: evaluate RealNet (image/pixel AUROC, exact AU-PRO).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="model.pt or best.pt from train_realnet.py")
    cli.add_data_args(
        p, default=None, help="data set root (default: the one the checkpoint was trained on)"
    )
    p.add_argument(
        "--categories", default=None, help="comma-separated (default: the checkpoint's)"
    )
    p.add_argument(
        "--backbone-weights",
        default=None,
        help="imagenet | PATH.pth | random (default: the weights the checkpoint was trained with)",
    )
    p.add_argument(
        "--image-score",
        default=IMAGE_SCORE,
        choices=["avgpool", "max"],
        help="avgpool: max of the pooled map (authors); max: max of the map (MVTec's script)",
    )
    p.add_argument(
        "--pool", type=int, default=POOL, help="average-pooling window of --image-score avgpool"
    )
    p.add_argument(
        "--fpr-limit", type=float, default=FPR_LIMIT, help="AU-PRO integration limit (MVTec AD)"
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="test batch size, also the throughput batch"
    )
    p.add_argument(
        "--throughput-repeats", type=int, default=5, help="timed forward passes (after 2 warm-up)"
    )
    p.add_argument(
        "--throughput",
        action="store_true",
        help="with --predict: also time the forward pass alone on the lot's first "
        "batch (throughput.json in the lot; evaluation always reports it)",
    )
    p.add_argument(
        "--panels", type=int, default=-1, help="heatmap panels per category (-1 all, 0 none)"
    )
    p.add_argument(
        "--predict",
        default=None,
        help="score the images of this folder (no labels needed) into a lot folder "
        "of its own (realnet/predict.py)",
    )
    p.add_argument(
        "--stop-on-unreadable",
        action="store_true",
        help="with --predict: stop at the first image that cannot be read (default: "
        "skip it and list it in the lot's skipped.csv)",
    )
    p.add_argument(
        "--calibration",
        default=None,
        help="the calibration file to use (python3 -m realnet.calibration, or the "
        "calibration.json of an earlier lot; default: the checkpoint's)",
    )
    p.add_argument(
        "--image-threshold",
        type=float,
        default=None,
        help="with --predict: NG when the image score is >= this (replaces the "
        "calibrated one; recorded as set by hand)",
    )
    p.add_argument(
        "--pixel-threshold",
        type=float,
        default=None,
        help="with --predict: the masks and the contour are map >= this (replaces "
        "the calibrated one; recorded as set by hand)",
    )
    p.add_argument(
        "--export",
        default=None,
        help="only export the whole model (uint8 images of any size -> score, "
        "map at the input's size, OK/NG) as torch.export programs: PATH.pt2 "
        "and PATH's reference-RRS variant, described in PATH's .export.json, "
        "checked against --predict's pipeline on the first --batch-size test "
        "images (--predict DIR's if given); realnet/export.py",
    )
    cli.add_workers_arg(p)
    precision.add_precision_arg(p, "the backbone, UNets and discriminator (maps stay float32)")
    cli.add_device_arg(p)
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default <checkpoint folder>/eval); with --predict the "
        "lot's own folder, new or empty (default <checkpoint folder>/predict/"
        "<DIR's name>-<time>)",
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------


def score_images(maps, image_score, pool):
    """--image-score avgpool (max of the pool x pool average-pooled map) or max."""
    return metrics.image_scores(maps, pool="max" if image_score == "max" else pool)


def compute_metrics(maps, masks, labels, has_masks, scores, fpr_limit):
    """Image AUROC, pixel AUROC, AU-PRO of one set of images, with a sentence for each
    metric that cannot be computed (and why)."""
    result, missing = {}, {}
    result["image_auroc"] = metrics.image_auroc(labels, scores)
    if result["image_auroc"] is None:
        kind = "anomalous" if not labels.any() else "good"
        missing["image_auroc"] = (
            f"needs good and anomalous images; this split has no {kind} images"
        )
    if not labels.any():
        why = (
            "pixel metrics need anomalous test images with ground-truth masks; this split has none"
        )
        missing["pixel_auroc"] = missing["au_pro"] = why
        result["pixel_auroc"] = result["au_pro"] = None
    elif not has_masks.all():
        why = f"pixel metrics need masks: {int((~has_masks).sum())} anomalous test images have no ground-truth mask"
        missing["pixel_auroc"] = missing["au_pro"] = why
        result["pixel_auroc"] = result["au_pro"] = None
    else:
        result["pixel_auroc"] = metrics.pixel_auroc(maps, masks)
        result["au_pro"] = metrics.au_pro(maps, masks, fpr_limit)
        if result["au_pro"] is None:
            missing["au_pro"] = (
                "the masks of the anomalous images are empty: AU-PRO needs defect regions"
            )
        if result["pixel_auroc"] is None:
            missing["pixel_auroc"] = "needs anomalous and defect-free pixels"
    return result, missing


def defect_rows(labels, defects):
    """Per defect type, the test images its metrics are computed on: its own and every good one."""
    return {defect: (defects == defect) | ~labels for defect in sorted(set(defects[labels]))}


def evaluate_category(
    model,
    features,
    dataset,
    category,
    device,
    out,
    batch_size,
    workers,
    image_score,
    pool,
    fpr_limit,
    panels,
    calibrated,
):
    samples = dataset.test(category)
    if not samples:
        raise cli.UserError(f"{dataset.root!r}: category {category!r} has no test images")
    size = model.config["input_size"]
    maps, masks = dataset_maps(
        model,
        features,
        data.TestSet(samples, size),
        device,
        batch_size,
        workers,
        f"eval {category}",
    )
    labels = np.array([s.label for s in samples], dtype=bool)
    has_masks = np.array([s.mask is not None for s in samples if s.label == 1], dtype=bool)
    defects = np.array([s.defect for s in samples])
    scores = score_images(maps, image_score, pool)

    result, missing = compute_metrics(maps, masks, labels, has_masks, scores, fpr_limit)
    per_defect = {}
    for defect, rows in defect_rows(labels, defects).items():
        sub_has_masks = np.array(
            [s.mask is not None for s in samples if s.label == 1 and s.defect == defect]
        )
        numbers, why = compute_metrics(
            maps[rows], masks[rows], labels[rows], sub_has_masks, scores[rows], fpr_limit
        )
        per_defect[defect] = {**numbers, "images": int((defects == defect).sum())}
        if why:
            per_defect[defect]["not_computed"] = why

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
    if panels:
        write_panels(
            samples,
            maps,
            masks,
            scores,
            picture["value"],
            picture["note"],
            size,
            os.path.join(out, "panels", category),
            panels,
            probability=not model.fused,
        )
    return result, rows_csv


# ----------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------


def protocol(image_score, pool, fpr_limit, input_size, anomaly_map):
    """How every number in metrics.json was computed, in words."""
    return {
        "anomaly_map": f"{anomaly_map}: {ANOMALY_MAPS[anomaly_map]}",
        "image_score": f"max of the {pool}x{pool} average-pooled map (stride 1, no padding)"
        if image_score == "avgpool"
        else "max of the map",
        "resolution": f"{input_size}x{input_size} (the input size; masks resized with nearest)",
        "au_pro": f"MVTec AD definition, exact, FPR limit {fpr_limit}",
        "auroc_flipped": False,
        "image_labels": "from the test folders (good vs a defect type)",
        "per_defect": "each defect type's images together with all good images",
    }


def print_table(results, summary):
    fmt = lambda v: "  n/a " if v is None else f"{100 * v:6.2f}"
    print(f"{'category':<16} {'image':>6} {'pixel':>6} {'AU-PRO':>6}")
    for category, r in results.items():
        print(f"{category:<16} {fmt(r['image_auroc'])} {fmt(r['pixel_auroc'])} {fmt(r['au_pro'])}")
    if len(results) > 1:
        print(
            f"{'mean':<16} {fmt(summary['image_auroc'])} {fmt(summary['pixel_auroc'])} {fmt(summary['au_pro'])}"
        )


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def check_images(args, ckpt):
    """The images the exported programs are checked on: the first --batch-size images of
    --predict DIR (no labelled data set needed), else of the first category's test set."""
    if args.predict:
        return predict.list_lot(args.predict)[: args.batch_size]
    dataset = data.open_recorded_dataset(
        args.data, args.format, ckpt.get("dataset"), f"--checkpoint {args.checkpoint!r}"
    )
    categories = cli.parse_list(args.categories) if args.categories else ckpt["categories"]
    return [s.image for s in dataset.test(categories[0])[: args.batch_size]]


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


def predict_folder(args, model, features, calibrated, device):
    """--predict DIR: score, decide and map every image of a folder (no labels), as one lot."""
    record = calibrated and calibrated | {"checkpoint": os.path.abspath(args.checkpoint)}
    timing = (
        (lambda images: throughput.measure(model, features, images, args.throughput_repeats))
        if args.throughput
        else None
    )
    predict.predict_lot(
        model,
        features,
        args.predict,
        device,
        calibrated,
        out=args.out,
        checkpoint=args.checkpoint,
        image_score=args.image_score,
        pool=args.pool,
        batch_size=args.batch_size,
        workers=args.workers,
        stop_on_unreadable=args.stop_on_unreadable,
        calibration_record=record,
        settings=cli.args_to_dict(args),
        throughput=timing,
    )


def export_model(args, model, features, ckpt, calibrated):
    """--export PATH: the whole model as torch.export programs, checked against --predict.
    The calibration (checked against --image-score and --pool) is inside."""
    pool = args.pool if args.image_score == "avgpool" else 1  # 1: the map's plain maximum
    calibrated = calibrated or {}
    report = export.export_whole_model(
        model,
        features,
        args.export,
        check_images(args, ckpt),
        pool=pool,
        image_threshold=calibrated.get("image"),
        pixel_threshold=calibrated.get("pixel"),
        checkpoint=args.checkpoint,
    )
    print(export.describe(report))


def evaluate_test_set(args, model, features, ckpt, calibrated, device, out, size):
    """The test split of every category: metrics.json, scores.csv, panels/."""
    dataset = data.open_recorded_dataset(
        args.data, args.format, ckpt.get("dataset"), f"--checkpoint {args.checkpoint!r}"
    )
    categories = cli.parse_list(args.categories) if args.categories else ckpt["categories"]
    for category in categories:  # a missing mask or category: refused before any output
        dataset.test(category)
    results, rows = {}, []
    for category in categories:
        results[category], category_rows = evaluate_category(
            model,
            features,
            dataset,
            category,
            device,
            out,
            args.batch_size,
            args.workers,
            args.image_score,
            args.pool,
            args.fpr_limit,
            args.panels,
            calibrated,
        )
        rows += category_rows

    first = data.TestSet(dataset.test(categories[0])[: args.batch_size], size)
    images = torch.stack([first[i]["image"] for i in range(len(first))]).to(device)
    speed = throughput.measure(model, features, images, args.throughput_repeats)

    summary = metrics.mean_over_categories(results)
    learned = ckpt.get("learning_check") or {}
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
            "protocol": protocol(
                args.image_score,
                args.pool,
                args.fpr_limit,
                size,
                model.config.get("anomaly_map", "discriminator"),
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
        f"throughput {speed['images_per_s']} images/s (batch {speed['batch']}, {speed['device']}); "
        f"wrote {os.path.join(out, 'metrics.json')}, scores.csv, panels/"
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
    size = model.config["input_size"]
    check_pool(args.pool, args.image_score, size)
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
        export_model(args, model, features, ckpt, calibrated)
        return
    with precision.autocast(args.precision, device):  # the networks' arithmetic
        if args.predict:
            predict_folder(args, model, features, calibrated, device)
            return
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
        prepare_output_folder(
            out, files=("metrics.json", "scores.csv", "args.json"), subfolders=("panels",)
        )
        evaluate_test_set(args, model, features, ckpt, calibrated, device, out, size)


if __name__ == "__main__":
    cli.run(main)
