"""How visible must a pasted anomaly be? Choosing anomalies.MIN_PASTE_CONTRAST (issue 28).

A synthetic anomaly blends an appearance into the image under a mask; with a small delta or
an appearance close to the image the pasted region barely changes, and on a natural
high-frequency texture (granite, sand) it is then invisible in the image itself, yet labelled
anomalous. `anomalies.paste_contrast` measures the change: RMS of (A - I) under the mask in
units of the image's own spread there. This script draws synthetic anomalies with no contrast
rule (every first draw kept) on held-out TRAINING images, as select_features.py's visibility
check does (4 images get the anomalies, the other training images fit a per-location Gaussian
of the backbone's features), and scores each sample alone: the pixel AUROC of its novelty map
(mean of the layers) against its mask. Never a test split.

    python3 benchmarks/paste_contrast.py --data data/demo --categories granite \\
        --dtd data/demo_dtd --out benchmarks/results/paste_contrast

Writes OUT.json (per category: each sample's contrast, delta, source and novelty AUROC, and
the novelty by contrast bin) and OUT.png (novelty AUROC against contrast, one panel per
category, the threshold drawn).
"""

import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from realnet import cli, data, metrics, viz  # noqa: E402
from realnet.anomalies import AnomalySynthesizer  # noqa: E402
from realnet.backbone import load_backbone  # noqa: E402
from realnet.files import atomic_write_json, atomic_save_image  # noqa: E402
from realnet.stream import AnomalyStream  # noqa: E402
from realnet.visibility import novelty_maps  # noqa: E402

BINS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, np.inf)


def measure(args, category, backbone):
    dataset = data.open_dataset(args.data, "auto", [category])
    samples = dataset.train(category)
    fit, targets = samples[: -args.held], samples[-args.held :]
    normal = torch.stack([data.to_tensor(data.load_image(s.image, args.size)) for s in fit])
    synthesizer = AnomalySynthesizer(
        category, dataset.format, args.size, args.sdas, args.dtd, "none", min_contrast=0.0
    )
    stream = AnomalyStream(targets, args.size, {category: synthesizer}, args.seed, 0.0)
    raws = [stream.raw(g) for g in range(args.samples)]
    images = torch.stack([data.to_tensor(r["anomalous"]) for r in raws])
    maps = np.mean(novelty_maps(backbone, normal, images, "cpu"), axis=0)
    rows = [
        dict(
            contrast=r["contrast"],
            delta=r["delta"],
            kind=r["kind"],
            novelty_auroc=metrics.pixel_auroc(m[None], r["mask"][None]),
        )
        for r, m in zip(raws, maps)
    ]
    by_bin = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        inside = [x["novelty_auroc"] for x in rows if lo <= x["contrast"] < hi]
        by_bin.append(
            dict(
                lo=lo,
                hi=None if hi == np.inf else hi,
                n=len(inside),
                novelty_auroc=float(np.mean(inside)) if inside else None,
            )
        )
    return dict(samples=rows, by_bin=by_bin)


def draw(found, threshold, path):
    from PIL import Image, ImageDraw

    panels = []
    for category, result in found.items():
        w = h = 220
        canvas = Image.new("RGB", (w, h), "white")
        d = ImageDraw.Draw(canvas)
        x0, y0, x1, y1 = 30, 10, w - 10, h - 30  # axes: contrast 0..3, AUROC 0.3..1
        d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))

        def xy(c, a):
            return (x0 + min(c, 3.0) / 3.0 * (x1 - x0), y1 - (a - 0.3) / 0.7 * (y1 - y0))

        d.line([xy(0, 0.5), xy(3, 0.5)], fill=(180, 180, 180))
        if threshold:
            d.line([xy(threshold, 0.3), xy(threshold, 1.0)], fill=(200, 0, 0))
        for s in result["samples"]:
            x, y = xy(s["contrast"], max(0.3, s["novelty_auroc"]))
            colour = (0, 90, 200) if s["kind"] == "dtd" else (0, 150, 0)
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        d.text((x0, y1 + 4), "paste contrast 0 .. 3", fill=(0, 0, 0))
        d.text((2, y0), "1.0", fill=(0, 0, 0))
        d.text((2, y1 - 8), "0.3", fill=(0, 0, 0))
        panels.append(viz.labelled(np.asarray(canvas), f"{category}: novelty AUROC per sample"))
    atomic_save_image(viz.to_pil(viz.hstack(panels)), path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="MVTec-layout data set root")
    p.add_argument("--categories", nargs="+", required=True)
    p.add_argument("--dtd", required=True, help="DTD-style texture folder")
    p.add_argument("--sdas", default=None, help="SDAS folder (default: DTD only)")
    p.add_argument("--size", type=int, default=128, help="input side (demo: 128)")
    p.add_argument("--samples", type=int, default=96, help="synthetic anomalies per category")
    p.add_argument("--held", type=int, default=4, help="training images given the anomalies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=1.5, help="drawn in the picture only")
    p.add_argument("--out", required=True, help="OUT.json and OUT.png")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    backbone = load_backbone("random", (1, 2))
    found = {c: measure(args, c, backbone) for c in args.categories}
    for category, result in found.items():
        print(
            category,
            " ".join(
                f"[{b['lo']:.2f},{b['hi'] or 'inf'}): n={b['n']} "
                f"{'-' if b['novelty_auroc'] is None else format(b['novelty_auroc'], '.2f')}"
                for b in result["by_bin"]
            ),
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    record = dict(args=vars(args), threshold=args.threshold, categories=found)
    atomic_write_json(args.out + ".json", record)
    draw(found, args.threshold, args.out + ".png")


if __name__ == "__main__":
    cli.run(main)
