"""Stage 3: anomaly-aware feature selection, AFS (paper §3.2, eq. 4).

Which backbone channels see anomalies? Make images with synthetic anomalies A and keep
their clean originals I. For every layer k and channel i of the frozen backbone, the squared
feature difference d = (phi_k,i(A) - phi_k,i(I))^2, min-max normalised over the batch,
should look like the anomaly mask M (resized, nearest, to the feature map):

    loss_k,i = mean over the batch and positions of (d_norm - M)^2

summed over 64 batches of 16. A channel with a low loss lights up where the anomaly is and
stays dark elsewhere: RealNet keeps the dims[k] lowest-loss channels of each layer
(default 256, 512, 512, 256 of WideResNet50's 256, 512, 1024, 2048: so layers 1 and 2 are
kept whole, as in the authors' configuration) and reconstructs only those.

    python3 -m demo_data --out data/demo --dtd-out data/demo_dtd
    python3 select_features.py --data data/demo --category washer --dtd data/demo_dtd \\
        --out runs/washer
    # smoke run without ImageNet weights (about a minute on 2 CPU cores):
    python3 select_features.py --data data/demo --category washer --dtd data/demo_dtd \\
        --input-size 128 --batches 16 --backbone-weights random --out runs/smoke

Writes to the folder --out: afs.pt (the AFS file, read by train_realnet.py, which takes
its data set, anomaly source, input size and backbone from it), afs_scores.png (the
per-channel losses, kept channels in red), afs_args.json, and with --dump N the folder
afs_examples/ with N of the synthetic anomalies AFS looked at. One backbone pass per
batch serves all layers (anomalous and clean images concatenated); the authors run the
whole backbone once per layer, four times the work. An interrupted run continues from
afs.partial when started again with the same settings.

Beyond the paper, --min-source-visibility first checks that the backbone can see each
source's synthetic anomalies at all (realnet/visibility.py) and drops a source it cannot;
the AFS file then records the source actually used, which train_realnet.py takes.
"""

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from realnet import cli, data, runs, visibility
from realnet.backbone import Backbone, load_backbone
from realnet.files import atomic_save_image, atomic_torch_save, load_checkpoint
from realnet.files import prepare_output_folder
from realnet.loaders import start_loader
from realnet.model import require_reconstructable
from realnet.progress import Progress
from realnet.stream import AnomalyStream, StreamSampler, dump_examples
from realnet.anomalies import synthesizers_for


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stage 3: AFS, choose the backbone channels that see anomalies.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cli.add_data_args(p)
    p.add_argument(
        "--category", default=None, help="category to select for (default: the only one)"
    )
    cli.add_anomaly_source_args(p)
    p.add_argument("--input-size", type=int, default=256, help="image side (the paper's)")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3, 4], help="backbone layers")
    p.add_argument(
        "--dims",
        type=int,
        nargs="+",
        default=[256, 512, 512, 256],
        help="channels kept per layer (the authors')",
    )
    p.add_argument(
        "--batches", type=int, default=64, help="batches of synthetic anomalies (the authors')"
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="anomalous images per batch (the authors')"
    )
    p.add_argument(
        "--backbone-weights",
        default="imagenet",
        help="imagenet (torchvision) | PATH.pth (e.g. timm's racm file) | random (smoke only)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic anomalies")
    p.add_argument(
        "--out",
        default=None,
        help="output folder for afs.pt and its pictures (default runs/<category>)",
    )
    p.add_argument("--dump", type=int, default=0, help="also write N synthetic anomalies as PNGs")
    cli.add_workers_arg(p)
    cli.add_device_arg(p)
    p.add_argument(
        "--save-every", type=int, default=8, help="batches between resumable partial states"
    )
    p.add_argument(
        "--min-source-visibility",
        type=float,
        default=0.0,
        help="beyond the paper (0: off): drop an anomaly source (SDAS or DTD, never both) "
        "whose synthetic anomalies the backbone cannot tell from the normal images: "
        "pixel AUROC of a per-location Gaussian novelty at most this on every layer, "
        "measured on the training images (realnet/visibility.py); the AFS file and "
        "so train_realnet.py then use the other source alone",
    )
    return p.parse_args(argv)


def check_dims(layers, dims):
    if len(dims) != len(layers):
        raise cli.UserError(
            f"--dims has {len(dims)} values but --layers has {len(layers)}; give one per layer"
        )
    for layer, dim in zip(layers, dims):
        if layer not in (1, 2, 3, 4):
            raise cli.UserError(f"--layers: {layer} is not a WideResNet50 layer (1-4)")
        channels = Backbone.channels[layer - 1]
        if not 1 <= dim <= channels:
            raise cli.UserError(f"--dims: {dim} channels for layer{layer}, which has {channels}")


def channel_scores(backbone, loader, device, batches, start_batch=0, sums=None, on_batch=None):
    """Sum over batches of the per-channel AFS loss of every layer, one backbone pass per
    batch. Returns (sums: list of float64 (C_k,), timing: seconds spent per part)."""
    from realnet.ops import (
        afs_channel_loss,
    )  # falls back to the reference (one warning) if unbuilt

    sums = sums or [torch.zeros(c, dtype=torch.float64) for c in backbone.out_channels]
    timing = {"data": 0.0, "backbone": 0.0, "loss": 0.0}
    progress = Progress(batches, "afs", unit="img", every=1, start_step=start_batch)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tick = time.perf_counter()
    for step, batch in enumerate(loader, start=start_batch + 1):
        anomalous, clean = batch["image"].to(device), batch["clean"].to(device)
        mask = batch["mask"].to(device)
        t_data = time.perf_counter()
        features = backbone(torch.cat([anomalous, clean]))  # one pass: both halves, all layers
        sync()
        t_backbone = time.perf_counter()
        b = anomalous.shape[0]
        losses = [afs_channel_loss(f[:b], f[b:], mask).double().cpu() for f in features]
        for total, loss in zip(sums, losses):
            total += loss
        t_loss = time.perf_counter()
        timing["data"] += t_data - tick
        timing["backbone"] += t_backbone - t_data
        timing["loss"] += t_loss - t_backbone
        tick = t_loss
        progress.update(
            step,
            items=b,
            **{f"layer{l}": float(x.mean()) for l, x in zip(backbone.layers, losses)},
        )
        if on_batch:
            on_batch(step, sums)
    return sums, timing


def select_channels(score, dim):
    """The dim channels with the lowest loss, as ascending indices. A NaN loss (a channel
    that never varies) becomes the largest finite loss, so it is picked last."""
    score = score.clone()
    finite = torch.isfinite(score)
    score[~finite] = score[finite].max() if finite.any() else 0.0
    order = torch.sort(score, stable=True).indices  # ties: the lower channel first
    return torch.sort(order[:dim]).values, score


def draw_scores(scores, indices, layers, width=1024, height=150):
    """One panel per layer: each channel's summed loss (x: channel, y: loss, low = bottom);
    kept channels red, dropped grey, the cut as a blue line."""
    panels = []
    for layer, score, kept in zip(layers, scores, indices):
        s = score.numpy()
        low, high = float(s.min()), float(s.max())
        canvas = Image.new("RGB", (width, height + 20), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        keep = np.zeros(len(s), bool)
        keep[kept.numpy()] = True
        cut = float(s[keep].max())
        draw.text(
            (4, 3),
            f"layer{layer}: kept {keep.sum()} of {len(s)} channels (loss <= {cut:.4g}); "
            f"loss {low:.4g} .. {high:.4g}",
            fill=(0, 0, 0),
        )
        y = lambda v: 20 + (height - 4) - int((v - low) / (high - low + 1e-12) * (height - 8))
        draw.line([(0, y(cut)), (width, y(cut))], fill=(60, 90, 230))
        for i in np.argsort(keep, kind="stable"):  # red dots on top
            x = int(i * (width - 2) / max(1, len(s) - 1))
            draw.rectangle(
                [x, y(s[i]) - 1, x + 1, y(s[i])],
                fill=(220, 40, 40) if keep[i] else (150, 150, 150),
            )
        panels.append(np.asarray(canvas))
    return Image.fromarray(np.concatenate(panels, axis=0))


def load_partial(path, settings, batches):
    """(batches done, their summed losses) of an interrupted run with the same settings, or
    (0, None). The stream is a pure function of (seed, g), so continuing a partial sum gives
    exactly the result of an uninterrupted run."""
    if not os.path.isfile(path):
        return 0, None
    partial = load_checkpoint(path, "partial AFS state", kind="afs_partial")
    changed = runs.differences(partial["settings"], settings)
    if not changed and partial["batches_done"] <= batches:
        print(f"resuming from {path}: {partial['batches_done']} of {batches} batches done")
        return partial["batches_done"], partial["sums"]
    why = "; ".join(changed) or f"{partial['batches_done']} batches done, --batches {batches} now"
    print(f"starting afresh: {path} was made with other settings ({why})")
    return 0, None


# arguments that do not change the AFS file (where and how fast it is computed)
RUN_ONLY = ("out", "dump", "workers", "device", "save_every")


def require_same_afs(path, args):
    """An afs.pt already in --out is replaced only by one made with the same settings: a
    rerun with other --dims (say) would otherwise silently replace what train_realnet.py
    runs may have been made from."""
    if not os.path.isfile(path):
        return
    recorded = load_checkpoint(path, f"--out: the existing {path!r}", kind="afs").get("args", {})
    settings = lambda values: {cli.flag(k): v for k, v in values.items() if k not in RUN_ONLY}
    runs.require_same_settings(
        settings(recorded),
        settings(cli.args_to_dict(args)),
        f"--out: {path!r} was made with other settings",
        "choose another --out or delete it first",
    )


def drop_invisible_sources(backbone, train, category, dataset_format, args, device):
    """--min-source-visibility (beyond the paper, realnet/visibility.py): measure how visible
    each source's synthetic anomalies are to the backbone and drop a source nobody could
    learn from. Returns (the synthesizers to use, the record for the AFS file)."""
    scores = visibility.source_visibility(
        backbone,
        train,
        category,
        dataset_format,
        args.input_size,
        args.sdas,
        args.dtd,
        args.foreground,
        args.seed,
        device,
    )
    dropped = visibility.invisible_sources(scores, args.min_source_visibility)
    print(
        f"anomaly sources, pixel AUROC of their anomalies' novelty per layer (chance 0.5): "
        f"{visibility.describe(scores)}"
    )
    if dropped:
        print(
            f"note: --min-source-visibility {args.min_source_visibility}: the backbone cannot tell "
            f"{' and '.join(dropped)} anomalies from normal {category!r} images; AFS and training use "
            f"{' and '.join(s for s in scores if s not in dropped)} alone"
        )
    elif all(
        all(v is not None and v <= args.min_source_visibility for v in s) for s in scores.values()
    ):
        print(
            f"WARNING: no anomaly source reaches --min-source-visibility {args.min_source_visibility} on "
            f"{category!r}: all kept; the model may not learn its synthetic anomalies"
        )
    sdas = None if "sdas" in dropped else args.sdas
    dtd = None if "dtd" in dropped else args.dtd
    record = {"threshold": args.min_source_visibility, "pixel_auroc": scores, "dropped": dropped}
    return synthesizers_for(
        [category], dataset_format, args.input_size, sdas, dtd, args.foreground
    ), record


def main(argv=None):
    args = parse_args(argv)
    check_dims(args.layers, args.dims)
    cli.require_positive(
        batches=args.batches, batch_size=args.batch_size, save_every=args.save_every
    )
    cli.require_non_negative(workers=args.workers)
    if args.input_size < 32:
        raise cli.UserError(
            f"--input-size must be at least 32 (the backbone's stride), got {args.input_size}"
        )
    # train_realnet.py reconstructs every layer's map: an input size it cannot use is refused now
    require_reconstructable(
        args.input_size, [Backbone.strides[l - 1] for l in args.layers], layers=args.layers
    )
    if args.dump < 0:
        raise cli.UserError(f"--dump must be >= 0 (got {args.dump})")
    device = cli.resolve_device(args.device)
    dataset = data.open_dataset(args.data, args.format)
    category = cli.only_category(args.category, dataset.categories, repr(args.data))
    train = dataset.train(category)
    synthesizers = synthesizers_for(
        [category], dataset.format, args.input_size, args.sdas, args.dtd, args.foreground
    )
    # AFS looks at synthetic anomalies only (the authors switch the 'normal' type off)
    stream = AnomalyStream(train, args.input_size, synthesizers, seed=args.seed, normal_ratio=0.0)

    folder = args.out or os.path.join("runs", category)
    out, stem = os.path.join(folder, "afs.pt"), os.path.join(folder, "afs")
    # everything that can fail is checked before the first file is written
    prepare_output_folder(
        folder,
        subfolders=("afs_examples",),
        files=("afs.pt", "afs_scores.png", "afs_args.json", "afs.partial"),
    )
    require_same_afs(out, args)
    backbone = load_backbone(args.backbone_weights, args.layers).to(device)
    source_check = None
    if args.min_source_visibility > 0 and args.sdas and args.dtd:  # beyond the paper
        synthesizers, source_check = drop_invisible_sources(
            backbone, train, category, dataset.format, args, device
        )
        stream = AnomalyStream(
            train, args.input_size, synthesizers, seed=args.seed, normal_ratio=0.0
        )
    if args.dump:
        written = dump_examples(stream, args.dump, stem + "_examples")
        print(
            f"wrote {args.dump} synthetic anomalies to {stem}_examples/ (contact sheet: {written[-1]})"
        )
    cli.seed_everything(args.seed)

    # what a partial state (resumable) must share with this run
    settings = {
        "data": os.path.abspath(args.data),
        "format": dataset.format,
        "category": category,
        "input_size": args.input_size,
        "layers": args.layers,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "foreground": args.foreground,
        "source": synthesizers[category].source.describe(),
        "backbone": backbone.identity,
    }
    partial_path = stem + ".partial"
    start, sums = load_partial(partial_path, settings, args.batches)

    def save_partial(step, sums):
        if step % args.save_every == 0 and step < args.batches:
            atomic_torch_save(
                {"kind": "afs_partial", "settings": settings, "batches_done": step, "sums": sums},
                partial_path,
            )

    loader = start_loader(
        stream,
        args.workers,
        batch_size=args.batch_size,
        pin_memory=device.type == "cuda",
        sampler=StreamSampler(start, args.batches, args.batch_size),
    )
    print(
        f"AFS on {category!r} ({dataset.format}, {len(train)} training images), {args.batches} batches of "
        f"{args.batch_size} at {args.input_size}px, backbone {backbone.identity['weights']}, device {device}"
    )
    started = time.time()
    with torch.inference_mode():
        sums, timing = channel_scores(
            backbone, loader, device, args.batches, start, sums, save_partial
        )

    indices, scores = zip(
        *[select_channels(total.float(), dim) for dim, total in zip(args.dims, sums)]
    )
    indices, scores = list(indices), list(scores)
    afs = {
        "kind": "afs",
        "version": 1,
        "layers": list(args.layers),
        "dims": list(args.dims),
        "indices": indices,
        "scores": scores,
        "backbone": backbone.identity,
        "input_size": args.input_size,
        "category": category,
        "dataset": {
            **dataset.describe(),
            "category": category,
            "class_id": dataset.class_id(category),
            "train_images": len(train),
        },
        "anomaly_source": synthesizers[category].describe(),
        "batches": args.batches,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "source_visibility": source_check,
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
        "args": cli.args_to_dict(args),
    }
    atomic_torch_save(afs, out)
    atomic_save_image(draw_scores(scores, indices, args.layers), stem + "_scores.png")
    runs.save_args(args, folder, "afs_args.json")  # with the files it describes, not before
    if os.path.exists(partial_path):
        os.remove(partial_path)
    print(
        f"wrote {out} and {stem}_scores.png in {time.time() - started:.1f} s (data {timing['data']:.1f} s, "
        f"backbone {timing['backbone']:.1f} s, AFS loss {timing['loss']:.1f} s)"
    )
    for layer, dim, kept, score in zip(args.layers, args.dims, indices, scores):
        print(
            f"  layer{layer}: kept {dim} of {len(score)} channels, mean loss kept "
            f"{score[kept].mean():.4f} vs all {score.mean():.4f}"
        )


if __name__ == "__main__":
    cli.run(main)
