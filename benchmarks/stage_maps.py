"""Which stage of a trained RealNet localises the anomalies? Its maps of one test split.

RealNet's anomaly map is the discriminator's output; its input is the residuals that RRS
kept; those come from the reconstruction of each level. This script scores the same test
images with each of these, so that a reader can see where a miss comes from:

    discriminator   the discriminator's map (the paper's; what evaluate.py reports for a
                    model trained with the default --anomaly-map discriminator)
    rrs residuals   the sum over channels of the residuals RRS kept (the discriminator's
                    input), upsampled to the image
    level N energy  sum over the level's AFS channels of (features - reconstruction)^2,
                    upsampled to the image: what reconstruction alone would say
    discriminator log-odds   its logit 1 - logit 0 (the fused map's first part)
    fused           with a model trained with --anomaly-map fused: the map it reports
                    instead (evaluate.py), the calibrated mean of the discriminator's
                    log-odds and the level energies

and prints image AUROC / pixel AUROC / AU-PRO of each, for the whole split and per defect
type, with the same metric code and image score as evaluate.py (on the CPU).

    python3 benchmarks/stage_maps.py --checkpoint runs/demo/tablet/realnet/best.pt
    python3 benchmarks/stage_maps.py --checkpoint CKPT --json out.json

A diagnosis, not a method: pick the map RealNet reports by looking at these numbers on a
test split, and that split no longer measures anything.
"""

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import evaluate  # noqa: E402
from realnet import calibration, cli, data, metrics  # noqa: E402
from realnet.files import atomic_write_json  # noqa: E402
from realnet.inference import load_model  # noqa: E402
from realnet.model import map_parts  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "au_pro")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="model.pt or best.pt from train_realnet.py")
    p.add_argument(
        "--category", default=None, help="test split to score (default: the checkpoint's first)"
    )
    p.add_argument("--data", default=None, help="data set root (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=16, help="test images per forward pass")
    p.add_argument("--json", default=None, help="also write the table to this file")
    p.add_argument(
        "--calibration",
        default=None,
        help="the calibration file whose map scale the fused row uses (default: the checkpoint's)",
    )
    return p.parse_args(argv)


@torch.no_grad()
def stage_maps(model, features, test_set, batch_size):
    """{map name: (N, S, S) array} and the masks (N, S, S) of every test image."""
    size = model.config["input_size"]
    maps, masks = {}, []
    upsample = lambda x: F.interpolate(
        x.float(), size=(size, size), mode="bilinear", align_corners=False
    )[:, 0]
    for batch in torch.utils.data.DataLoader(test_set, batch_size=batch_size):
        levels = features(batch["image"])
        out = model(levels, (size, size))
        # the discriminator's log-odds, then each level's energy (the fused map's parts)
        parts = map_parts(out["logits"], levels, out["reconstructions"])
        found = {
            "discriminator": out["discriminator_map"].float(),
            "discriminator log-odds": parts[:, 0],
            "rrs residuals": upsample(out["selected"].sum(1, keepdim=True)),
        }
        for n in range(1, parts.shape[1]):
            found[f"level {n} energy"] = parts[:, n]
        if model.fused:  # what the model reports (evaluate.py): their calibrated mean
            found["fused"] = out["anomaly_map"].float()
        for name, value in found.items():
            maps.setdefault(name, []).append(value.numpy())
        masks.append(batch["mask"][:, 0].numpy())
    return {name: np.concatenate(v) for name, v in maps.items()}, np.concatenate(masks)


def score(anomaly_maps, masks, labels, rows):
    """Image AUROC, pixel AUROC, AU-PRO of the images `rows`, as evaluate.py computes them."""
    m = anomaly_maps[rows]
    scores = metrics.score_images(m, evaluate.IMAGE_SCORE, evaluate.POOL)
    result, _ = metrics.compute_metrics(
        m,
        masks[rows],
        labels[rows],
        np.ones(int(labels[rows].sum()), bool),
        scores,
        evaluate.FPR_LIMIT,
    )
    return {k: result[k] for k in METRICS}


def main(argv=None):
    args = parse_args(argv)
    cli.require_positive(batch_size=args.batch_size)
    model, features, ckpt = load_model(args.checkpoint, None, torch.device("cpu"))
    record = ckpt.get("calibration")
    if args.calibration:  # as evaluate.py --calibration
        record = calibration.read_file(
            args.calibration, calibration.weights_digest(model.state_dict()), model.fused
        )
    if model.fused and record:  # the map scale evaluate.py scores with
        calibration.set_map_scale(model, record["map_scale"])
    elif model.fused:
        print(
            "note: the fused map is not calibrated (python3 -m realnet.calibration): no "
            "'fused' row"
        )
        model.fused = False
    dataset = data.open_recorded_dataset(
        args.data, "auto", ckpt.get("dataset"), f"--checkpoint {args.checkpoint!r}"
    )
    category = args.category or ckpt["categories"][0]
    samples = dataset.test(category)
    if any(s.label == 1 and s.mask is None for s in samples):
        raise cli.UserError(
            f"category {category!r}: some anomalous test images have no "
            "ground-truth mask; the pixel metrics need them"
        )
    maps, masks = stage_maps(
        model, features, data.TestSet(samples, model.config["input_size"]), args.batch_size
    )
    labels = np.array([s.label for s in samples], dtype=bool)
    defects = np.array([s.defect for s in samples])
    groups = {"all": np.ones(len(samples), bool), **metrics.defect_rows(labels, defects)}
    table = {
        group: {name: score(m, masks, labels, rows) for name, m in maps.items()}
        for group, rows in groups.items()
    }

    print(
        f"{category}: {len(samples)} test images, checkpoint {args.checkpoint} "
        f"(step {ckpt.get('step')})"
    )
    print(f"{'images':<10} {'map':<16} {'image':>6} {'pixel':>6} {'AU-PRO':>7}")
    for group, row in table.items():
        for name, values in row.items():
            print(
                f"{group:<10} {name:<16} "
                + " ".join(
                    f"{values[k]:>6.3f}" if k != "au_pro" else f"{values[k]:>7.3f}"
                    for k in METRICS
                )
            )
    if args.json:
        atomic_write_json(
            args.json,
            {
                "checkpoint": os.path.abspath(args.checkpoint),
                "step": ckpt.get("step"),
                "category": category,
                "maps": table,
            },
        )


if __name__ == "__main__":
    cli.run(main)
