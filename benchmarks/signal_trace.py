"""Where does a synthetic anomaly stop being visible? One trained RealNet, stage by stage.

A diagnosis (issue 28), on the held-out TRAINING images with the synthetic anomalies that
train_realnet.py validates on (never a test split). Each stage is turned into one map per
image and scored by pixel AUROC against the synthetic anomaly's mask (chance 0.5):

    L* all: novelty           novelty of the input's features: sum over channels of the squared
                              z-score against the normal training images' per-channel mean and
                              spread (what an ideal density model of the features could see)
    backbone, AFS-kept        the same, over the channels AFS kept (what RealNet reconstructs)
    backbone, AFS-dropped     the same, over the channels AFS dropped
    residual, level k         sum over channels of (phi_k - G_k(phi_k))^2
    RRS kept residuals        sum over the residual channels RRS kept (the discriminator's input)
    discriminator             its class-1 probability (what validation scores)

Per backbone channel it also measures how well the channel alone separates anomalous from normal
positions of the anomalous image (two-sided AUROC, 0.5 = blind), against its AFS loss.

    python3 benchmarks/signal_trace.py --checkpoint runs/demo/weave/realnet/model.pt \\
        --out benchmarks/results/signal_trace_weave

Writes OUT.json (the table), OUT_maps.png (per stage, two samples) and OUT_afs.png (AFS loss
against the channel's own separability, kept channels red).
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from realnet import cli, data, metrics, viz  # noqa: E402
from realnet.files import load_checkpoint  # noqa: E402
from realnet.inference import load_model  # noqa: E402
from realnet.stream import AnomalyStream  # noqa: E402
from realnet.anomalies import synthesizers_for  # noqa: E402
from realnet.validation import split_validation  # noqa: E402


def held_out_set(ckpt, size, n_samples=32):
    """Samples of the held-out stream train_realnet.py validates on (same split, seeds and
    sources; its first 2 x held-out images are the validation set, this takes n_samples,
    half with a synthetic anomaly) and which source made each ('normal', 'sdas', 'dtd')."""
    args = ckpt["args"]
    dataset = data.open_recorded_dataset(
        args["data"], args["format"], ckpt.get("dataset"), "checkpoint"
    )
    category = ckpt["categories"][0]
    train, held = split_validation(
        dataset.train(category), args["val_fraction"], args["seed"], log=lambda *_: None
    )
    synth = synthesizers_for(
        [category],
        dataset.format,
        size,
        args["sdas"],
        args["dtd"],
        args["foreground"],
        args.get("min_paste_contrast", 0.0),
    )
    stream = AnomalyStream(held, size, synth, args["seed"] + 1, args["normal_ratio"])
    items = [stream[g] for g in range(n_samples)]
    val = {key: torch.stack([it[key] for it in items]) for key in ("image", "mask")}
    val["anomalous"] = torch.tensor([it["anomalous"] for it in items])
    kinds = np.array([stream.raw(g)["kind"] for g in range(n_samples)])
    return val, train, category, kinds


def channel_stats(backbone, train, size, batch=8):
    """Per layer: (mean, std) of every channel at every position over the normal training
    images (a per-location Gaussian, as benchmarks/demo_accuracy.py's baseline), the variance
    floored at 1 % of the channel's variance over all positions."""
    feats = []
    for i in range(0, len(train), batch):
        images = torch.stack(
            [data.to_tensor(data.load_image(s.image, size)) for s in train[i : i + batch]]
        )
        feats.append([f.double() for f in backbone(images)])
    stats = []
    for layer in zip(*feats):
        f = torch.cat(layer)
        var = f.var(0) + 0.01 * f.var((0, 2, 3))[:, None, None] + 1e-12
        stats.append((f.mean(0), var.sqrt()))
    return stats


def up(x, size):
    return F.interpolate(
        x[:, None].float(), size=(size, size), mode="bilinear", align_corners=False
    )[:, 0]


def two_sided_auroc(values, mask):
    a = metrics.pixel_auroc(values, mask)
    return None if a is None else max(a, 1 - a)


@torch.no_grad()
def trace(model, features, ckpt, n_samples=32, batch=8):
    size = model.config["input_size"]
    val, train, category, kinds = held_out_set(ckpt, size, n_samples)
    backbone = features.backbone
    stats = channel_stats(backbone, train, size)
    kept = [np.asarray(i) for i in model.config["afs_indices"]]
    maps, per_channel = {}, [[] for _ in kept]
    for i in range(0, len(val["image"]), batch):
        image = val["image"][i : i + batch]
        raw = backbone(image)
        levels = features.select(raw)
        out = model(levels, (size, size))
        found = {}
        for k, (f, (mean, std), idx) in enumerate(zip(raw, stats, kept)):
            layer = model.config["layers"][k]
            z2 = ((f.double() - mean) / std) ** 2
            drop = np.setdiff1d(np.arange(f.shape[1]), idx)
            found[f"L{layer} all: novelty"] = up(z2.mean(1), size)
            found[f"L{layer} AFS-kept: novelty"] = up(z2[:, idx].mean(1), size)
            if len(drop):
                found[f"L{layer} dropped: novelty"] = up(z2[:, drop].mean(1), size)
            m = (
                F.interpolate(val["mask"][i : i + batch], size=f.shape[-2:], mode="nearest")[
                    :, 0
                ].numpy()
                > 0
            )
            anomalous = val["anomalous"][i : i + batch].numpy()
            if anomalous.any():  # per kept channel: raw value inside vs outside the mask
                per_channel[k].append((f[anomalous].float().numpy(), m[anomalous]))
        for k, (f, r) in enumerate(zip(levels, out["reconstructions"])):
            found[f"L{model.config['layers'][k]} residual"] = up(
                ((f.float() - r.float()) ** 2).sum(1), size
            )
        found["RRS kept"] = up(out["selected"].float().sum(1), size)
        found["discriminator"] = out["discriminator_map"].float()
        for name, value in found.items():
            maps.setdefault(name, []).append(value.float().numpy())
    masks = val["mask"][:, 0].numpy()
    maps = {name: np.concatenate(v) for name, v in maps.items()}
    table = {name: metrics.pixel_auroc(m, masks) for name, m in maps.items()}
    by_source = {}  # each source's anomalies against the normal samples
    for kind in sorted(set(kinds) - {"normal"}):
        rows = (kinds == kind) | (kinds == "normal")
        by_source[kind] = {
            name: metrics.pixel_auroc(m[rows], masks[rows]) for name, m in maps.items()
        }
    separability = []
    for k, chunks in enumerate(per_channel):
        values = np.concatenate([c[0] for c in chunks])  # (N, C, h, w)
        inside = np.concatenate([c[1] for c in chunks])  # (N, h, w)
        separability.append(
            [two_sided_auroc(values[:, c], inside) or 0.5 for c in range(values.shape[1])]
        )
    return table, by_source, maps, masks, val, separability, category, kinds


def draw_maps(maps, masks, val, kinds, rows, path, title):
    names = list(maps)
    lines = []
    for r in rows:
        image = viz.tensor_to_uint8(val["image"][r])
        cells = [viz.labelled(viz.draw_contour(image, masks[r] > 0), f"{kinds[r]} anomaly + mask")]
        for name in names:
            m = maps[name][r]
            lo, hi = np.percentile(m, 1), np.percentile(m, 99.5)
            auc = metrics.pixel_auroc(m[None], masks[r][None])
            cells.append(viz.labelled(viz.jet((m - lo) / max(hi - lo, 1e-12)), f"{name[:22]}"))
            cells[-1] = viz.labelled(cells[-1], f"AUROC {auc:.2f}")
        lines.append(viz.hstack(cells))
    picture = viz.to_pil(
        np.concatenate(
            [viz.labelled(np.full((2, lines[0].shape[1], 3), 255, np.uint8), title, 16)] + lines
        )
    )
    picture.save(path)


def draw_afs(afs, separability, layers, kept, path, title, width=520, height=260):
    """Per layer a scatter: x = AFS loss (low = kept), y = the channel's own two-sided AUROC."""
    panels = []
    for layer, score, sep, idx in zip(layers, afs["scores"], separability, kept):
        s, a = score.numpy(), np.asarray(sep)
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        d = ImageDraw.Draw(canvas)
        lo, hi = float(s.min()), float(s.max())
        px = lambda v: 40 + (v - lo) / (hi - lo + 1e-12) * (width - 60)
        py = lambda v: height - 30 - (v - 0.5) / 0.5 * (height - 60)
        d.rectangle([40, 30, width - 20, height - 30], outline=(0, 0, 0))
        on = np.zeros(len(s), bool)
        on[idx] = True
        for c in np.argsort(on, kind="stable"):
            x, y = px(s[c]), py(a[c] if on[c] else a[c])
            d.ellipse(
                [x - 2, y - 2, x + 2, y + 2], fill=(220, 40, 40) if on[c] else (150, 150, 150)
            )
        d.text(
            (4, 4),
            f"{title} layer{layer}: kept (red) median AUROC {np.median(a[on]):.3f}, "
            f"dropped {np.median(a[~on]) if (~on).any() else float('nan'):.3f}",
            fill=(0, 0, 0),
        )
        d.text((40, height - 24), f"AFS loss {lo:.3g} .. {hi:.3g} (low = kept)", fill=(0, 0, 0))
        d.text((2, 30), "1.0", fill=(0, 0, 0))
        d.text((2, height - 36), "0.5", fill=(0, 0, 0))
        panels.append(np.asarray(canvas))
    Image.fromarray(np.concatenate(panels)).save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="model.pt or best.pt of train_realnet.py")
    p.add_argument(
        "--out", required=True, help="output stem (OUT.json, OUT_maps.png, OUT_afs.png)"
    )
    p.add_argument(
        "--samples", type=int, default=32, help="held-out samples to score (half anomalous)"
    )
    p.add_argument("--title", default=None, help="caption of the pictures (default: the category)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    model, features, ckpt = load_model(args.checkpoint, None, torch.device("cpu"))
    table, by_source, maps, masks, val, separability, category, kinds = trace(
        model, features, ckpt, args.samples
    )
    title = args.title or f"{category}, step {ckpt.get('step')}"
    anomalous = np.nonzero(val["anomalous"].numpy())[0]
    order = sorted(anomalous, key=lambda r: -masks[r].sum())  # the largest of each source
    rows = [next(r for r in order if kinds[r] == k) for k in sorted(set(kinds[anomalous]))]
    draw_maps(
        maps,
        masks,
        val,
        kinds,
        rows + [r for r in order if r not in rows][: 3 - len(rows)],
        args.out + "_maps.png",
        f"{title}: held-out training images with synthetic anomalies; "
        "each map min-max, its own AUROC",
    )
    afs = load_checkpoint(ckpt["afs_path"], "afs", kind="afs")
    kept = model.config["afs_indices"]
    draw_afs(afs, separability, model.config["layers"], kept, args.out + "_afs.png", title)
    result = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "category": category,
        "step": ckpt.get("step"),
        "samples": args.samples,
        "pixel_auroc": table,
        "pixel_auroc_by_source": by_source,
        "kept_channel_auroc_median": [
            float(np.median(np.asarray(s)[k])) for s, k in zip(separability, kept)
        ],
        "all_channel_auroc_median": [float(np.median(s)) for s in separability],
        "kept_channel_auroc_max": [
            float(np.max(np.asarray(s)[k])) for s, k in zip(separability, kept)
        ],
    }
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"{title}: pixel AUROC of each stage on {args.samples} held-out samples "
        "(all | each source)"
    )
    for name, value in table.items():
        print(
            f"  {name:<20} {value:.3f} | "
            + " | ".join(f"{k} {v[name]:.3f}" for k, v in by_source.items())
        )
    for layer, med, mx in zip(
        model.config["layers"],
        result["kept_channel_auroc_median"],
        result["kept_channel_auroc_max"],
    ):
        print(
            f"  layer{layer} kept channels alone: median two-sided AUROC {med:.3f}, best {mx:.3f}"
        )


if __name__ == "__main__":
    cli.run(main)
