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
import dataclasses
import os
import time

import torch

from realnet import afs_file, cli, data, runs, visibility, viz
from realnet.backbone import Backbone, load_backbone
from realnet.files import atomic_save_image, atomic_torch_save, prepare_output_folder
from realnet.loaders import start_loader
from realnet.model import require_reconstructable
from realnet.progress import Progress
from realnet.stream import AnomalyStream, StreamSampler, dump_examples
from realnet.anomalies import synthesizers_for


def parse_args(argv=None):
    # fmt: off
    # (a table of flags: one per line, continuation lines aligned under the help text)
    p = argparse.ArgumentParser(
        description="Stage 3: AFS, choose the backbone channels that see anomalies.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = p.add_argument
    cli.add_data_args(p)
    add("--category", default=None, help="category to select for (default: the only one)")
    cli.add_anomaly_source_args(p)
    add("--input-size", type=int, default=256, help="image side (the paper's)")
    add("--layers", type=int, nargs="+", default=[1, 2, 3, 4], help="backbone layers")
    add("--dims", type=int, nargs="+", default=[256, 512, 512, 256], help="channels kept per "
                                                                          "layer (the authors')")
    add("--batches", type=int, default=64, help="batches of synthetic anomalies (the authors')")
    add("--batch-size", type=int, default=16, help="anomalous images per batch (the authors')")
    add("--backbone-weights", default="imagenet", help="imagenet (torchvision) | PATH.pth (e.g. "
                                                       "timm's racm file) | random (smoke only)")
    add("--seed", type=int, default=0, help="seed of the synthetic anomalies")
    add("--out", default=None, help="output folder for afs.pt and its pictures (default "
                                    "runs/<category>)")
    add("--dump", type=int, default=0, help="also write N synthetic anomalies as PNGs")
    cli.add_workers_arg(p)
    cli.add_device_arg(p)
    add("--save-every", type=int, default=8, help="batches between resumable partial states")
    add("--min-source-visibility", type=float, default=0.0, help="beyond the paper (0: off): "
                                                                 "drop an anomaly source (SDAS "
                                                                 "or DTD, never both) whose "
                                                                 "synthetic anomalies the "
                                                                 "backbone cannot tell from the "
                                                                 "normal images: pixel AUROC of "
                                                                 "a per-location Gaussian "
                                                                 "novelty at most this on "
                                                                 "average over the layers, "
                                                                 "measured on the "
                                                                 "training images "
                                                                 "(realnet/visibility.py); the "
                                                                 "AFS file and so "
                                                                 "train_realnet.py then use the "
                                                                 "other source alone")
    # fmt: on
    return p.parse_args(argv)


def check_args(args):
    """Every flag that cannot work is refused before any data is read."""
    if len(args.dims) != len(args.layers):
        raise cli.UserError(
            f"--dims has {len(args.dims)} values but --layers has {len(args.layers)}; "
            "give one per layer"
        )
    for layer, dim in zip(args.layers, args.dims):
        if layer not in (1, 2, 3, 4):
            raise cli.UserError(f"--layers: {layer} is not a WideResNet50 layer (1-4)")
        channels = Backbone.channels[layer - 1]
        if not 1 <= dim <= channels:
            raise cli.UserError(f"--dims: {dim} channels for layer{layer}, which has {channels}")
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


def channel_scores(backbone, loader, device, batches, start_batch=0, sums=None, on_batch=None):
    """Sum over batches of the per-channel AFS loss of every layer, one backbone pass per
    batch. Returns (sums: list of float64 (C_k,), timing: seconds spent per part)."""
    # falls back to the reference (one warning) if unbuilt
    from realnet.ops import afs_channel_loss

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
        means = {f"layer{l}": float(x.mean()) for l, x in zip(backbone.layers, losses)}
        progress.update(step, items=b, **means)
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


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What AFS looks at: the training images of one category of a data set and the
    synthesizers of their anomalies (with --min-source-visibility: the sources kept, and
    source_check, the record of why, for the AFS file)."""

    dataset: data.DatasetIndex
    category: str
    train: list
    synthesizers: dict
    source_check: dict = None


def open_inputs(args):
    """The data set, the category (--category or its only one), its training images and the
    anomaly synthesizers of --sdas and --dtd."""
    dataset = data.open_dataset(args.data, args.format)
    category = cli.only_category(args.category, dataset.categories, repr(args.data))
    train = dataset.train(category)
    synthesizers = synthesizers_for(
        [category], dataset.format, args.input_size, **cli.anomaly_settings(args)
    )
    return Inputs(dataset, category, train, synthesizers)


def anomaly_stream(args, inputs):
    # AFS looks at synthetic anomalies only (the authors switch the 'normal' type off)
    return AnomalyStream(
        inputs.train, args.input_size, inputs.synthesizers, seed=args.seed, normal_ratio=0.0
    )


def drop_invisible_sources(args, inputs, backbone, device):
    """--min-source-visibility (beyond the paper, realnet/visibility.py): measure how visible
    each source's synthetic anomalies are to the backbone and drop a source nobody could
    learn from. Returns the inputs with the sources kept and the record for the AFS file."""
    scores = visibility.source_visibility(
        backbone,
        inputs.train,
        inputs.category,
        inputs.dataset.format,
        args.input_size,
        args.sdas,
        args.dtd,
        args.foreground,
        args.seed,
        device,
        min_contrast=args.min_paste_contrast,
    )
    dropped = visibility.report_invisible_sources(
        scores, args.min_source_visibility, inputs.category
    )
    sdas = None if "sdas" in dropped else args.sdas
    dtd = None if "dtd" in dropped else args.dtd
    record = {"threshold": args.min_source_visibility, "pixel_auroc": scores, "dropped": dropped}
    settings = cli.anomaly_settings(args, sdas_dir=sdas, dtd_dir=dtd)
    synthesizers = synthesizers_for(
        [inputs.category], inputs.dataset.format, args.input_size, **settings
    )
    return dataclasses.replace(inputs, synthesizers=synthesizers, source_check=record)


def partial_settings(args, inputs, backbone):
    """What a partial state (resumable) must share with this run."""
    return {
        "data": os.path.abspath(args.data),
        "format": inputs.dataset.format,
        "category": inputs.category,
        "input_size": args.input_size,
        "layers": args.layers,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "foreground": args.foreground,
        "source": inputs.synthesizers[inputs.category].source.describe(),
        "backbone": backbone.identity,
    }


def afs_contents(args, inputs, backbone, indices, scores, timing):
    """The AFS file: the kept channels of every layer and what train_realnet.py needs to know
    of how they were chosen."""
    dataset, category = inputs.dataset, inputs.category
    return {
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
            "train_images": len(inputs.train),
        },
        "anomaly_source": inputs.synthesizers[category].describe(),
        "batches": args.batches,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "source_visibility": inputs.source_check,
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
        "args": cli.args_to_dict(args),
    }


# what afs.pt, its pictures and its partial state are called in --out
OUTPUT_FILES = ("afs.pt", "afs_scores.png", "afs_args.json", "afs.partial")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    device = cli.resolve_device(args.device)
    inputs = open_inputs(args)
    stream = anomaly_stream(args, inputs)

    folder = args.out or os.path.join("runs", inputs.category)
    out, stem = os.path.join(folder, "afs.pt"), os.path.join(folder, "afs")
    # everything that can fail is checked before the first file is written
    prepare_output_folder(folder, subfolders=("afs_examples",), files=OUTPUT_FILES)
    afs_file.require_same_afs(out, args)
    backbone = load_backbone(args.backbone_weights, args.layers).to(device)
    if args.min_source_visibility > 0 and args.sdas and args.dtd:  # beyond the paper
        inputs = drop_invisible_sources(args, inputs, backbone, device)
        stream = anomaly_stream(args, inputs)
    if args.dump:
        written = dump_examples(stream, args.dump, stem + "_examples")
        print(
            f"wrote {args.dump} synthetic anomalies to {stem}_examples/ "
            f"(contact sheet: {written[-1]})"
        )
    cli.seed_everything(args.seed)

    settings = partial_settings(args, inputs, backbone)
    partial = afs_file.PartialState(stem + ".partial", settings, args.batches, args.save_every)
    start, sums = partial.load()
    sampler = StreamSampler(start, args.batches, args.batch_size)  # the batches not done yet
    cuda = device.type == "cuda"
    loader = start_loader(
        stream, args.workers, batch_size=args.batch_size, pin_memory=cuda, sampler=sampler
    )
    print(
        f"AFS on {inputs.category!r} ({inputs.dataset.format}, {len(inputs.train)} training "
        f"images), {args.batches} batches of {args.batch_size} at {args.input_size}px, "
        f"backbone {backbone.identity['weights']}, device {device}"
    )
    started = time.time()
    with torch.inference_mode():
        sums, timing = channel_scores(
            backbone, loader, device, args.batches, start, sums, partial.save
        )

    chosen = [select_channels(total.float(), dim) for dim, total in zip(args.dims, sums)]
    indices, scores = [kept for kept, _ in chosen], [score for _, score in chosen]
    atomic_torch_save(afs_contents(args, inputs, backbone, indices, scores, timing), out)
    atomic_save_image(viz.draw_afs_scores(scores, indices, args.layers), stem + "_scores.png")
    runs.save_args(args, folder, "afs_args.json")  # with the files it describes, not before
    partial.remove()
    print(
        f"wrote {out} and {stem}_scores.png in {time.time() - started:.1f} s "
        f"(data {timing['data']:.1f} s, backbone {timing['backbone']:.1f} s, "
        f"AFS loss {timing['loss']:.1f} s)"
    )
    for layer, dim, kept, score in zip(args.layers, args.dims, indices, scores):
        print(
            f"  layer{layer}: kept {dim} of {len(score)} channels, mean loss kept "
            f"{score[kept].mean():.4f} vs all {score.mean():.4f}"
        )


if __name__ == "__main__":
    cli.run(main)
