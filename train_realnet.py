"""Stage 4: train RealNet (paper §3.3-3.4, SPEC §5) on one category's normal images.

Each step: half the batch are normal training images, half get a synthetic anomaly
(SDAS and/or DTD, SPEC §3). The frozen backbone gives features, AFS keeps the channels
chosen by select_features.py, one UNet per level reconstructs them, RRS keeps the residual
channels that carry the anomaly and a small discriminator segments it:

    loss = CE(logits, mask) + sum_k MSE(G_k(phi_k(A)), phi_k(I))

The paper's setting (one model per category, batch 16, Adam 1e-4, 1000 epochs):

    python3 train_realnet.py --data data/mvtec --category bottle --sdas data/sdas/bottle \\
        --afs runs/bottle/afs.pt --out runs/bottle/realnet

The demo at small scale (random backbone, layers 1-2 at 128 px; about 2-4 minutes on 2 CPU
cores; weave reaches image AUROC 0.98, pixel AUROC 0.99):

    python3 -m realnet.demo_data --out data/demo --dtd-out data/demo_dtd
    python3 select_features.py --data data/demo --category weave --dtd data/demo_dtd \\
        --input-size 128 --layers 1 2 --dims 32 64 --batches 4 --backbone-weights random \\
        --out runs/demo/afs.pt
    python3 train_realnet.py --data data/demo --category weave --dtd data/demo_dtd \\
        --afs runs/demo/afs.pt --width-ratio 0.25 --batch 8 --steps 300 --lr 1e-3 --out runs/demo/realnet
    python3 evaluate.py --checkpoint runs/demo/realnet/model.pt

Several processes (DDP; the same model as one process with the same global --batch):

    torchrun --nproc_per_node 2 train_realnet.py ...same arguments...

Writes to --out: model.pt (what evaluate.py reads), state.pt (everything needed to
continue: --resume), loss.jsonl, args.json, and with --val-fraction best.pt and val.jsonl.
One model over several categories (`--categories a,b,c`, "unified") is an option beyond the
paper, which trains one model per category.
"""
import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from realnet import anomaly, cli, data, distributed, metrics, viz
from realnet.backbone import load_backbone
from realnet.files import atomic_save_image, atomic_torch_save, atomic_write_text, file_digest, load_checkpoint
from realnet.model import ARCHITECTURES, RealNet, build_config, count_parameters, describe, realnet_loss
from realnet.progress import Progress


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train RealNet (SPEC §5).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data/demo", help="data set root (the embedded demo by default)")
    p.add_argument("--format", default="auto", help="auto | mvtec | mpdd | btad | visa | visa_csv | folder")
    p.add_argument("--category", default=None, help="the category (one model per category, as the paper)")
    p.add_argument("--categories", default=None,
                   help="UNIFIED option beyond the paper: one model over these comma-separated categories "
                        "(the --afs file may be made for any one of them)")
    p.add_argument("--afs", required=True, help="AFS file from select_features.py (the kept backbone channels)")
    p.add_argument("--sdas", default=None, help="SDAS images (synthesize.py); with --categories: DIR/<category>")
    p.add_argument("--dtd", default=None, help="DTD folder (images/<texture>/*); with --sdas: half each")
    p.add_argument("--foreground", default="category", choices=anomaly.FOREGROUND_MODES,
                   help="where anomalies may go: the authors' rule per category, auto (Otsu) or none")
    p.add_argument("--normal-ratio", type=float, default=0.5, help="share of normal samples per batch (paper)")
    p.add_argument("--backbone-weights", default=None,
                   help="imagenet | PATH.pth | random; default: the weights the AFS file was made with")
    p.add_argument("--input-size", type=int, default=None, help="image side; default: the AFS file's")
    p.add_argument("--arch", default="A", choices=sorted(ARCHITECTURES), help="A: one UNet per layer (paper)")
    p.add_argument("--width-ratio", type=float, default=0.5, help="UNet width / input channels (paper 0.5)")
    p.add_argument("--retention", type=float, default=1 / 3, help="share of residual channels RRS keeps (paper)")
    p.add_argument("--k-max", type=int, default=None, help="RRS channels ranked by max (default M*retention/2)")
    p.add_argument("--k-mean", type=int, default=None, help="RRS channels ranked by mean (default M*retention/2)")
    p.add_argument("--batch", type=int, default=16, help="global batch size (paper)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (paper)")
    p.add_argument("--epochs", type=int, default=1000, help="passes over the training images (paper)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps; overrides --epochs (short runs)")
    p.add_argument("--seed", type=int, default=0, help="model init, data order and synthetic anomalies")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this share of the TRAINING images to choose the checkpoint on (0 = last step)")
    p.add_argument("--val-every", type=int, default=500, help="steps between validations (with --val-fraction)")
    p.add_argument("--val-metric", default="pixel_auroc", choices=["pixel_auroc", "au_pro", "image_auroc"],
                   help="what best.pt maximises on the held-out training images")
    p.add_argument("--cache-features", default="auto", choices=["auto", "on", "off"],
                   help="keep the clean images' features (frozen backbone, no augmentation: exact); "
                        "auto = on when they take under 4 GiB")
    p.add_argument("--save-every", type=int, default=500, help="steps between resumable states")
    p.add_argument("--log-every", type=int, default=10, help="steps between progress lines / loss log entries")
    p.add_argument("--workers", type=int, default=2, help="data loader processes (0 = in-process)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available) | cpu | cuda")
    p.add_argument("--out", default=None, help="output folder (default runs/<category>/realnet)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    p.add_argument("--dump", type=int, default=0, help="write N example training pairs to OUT/examples")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Inputs: categories, AFS file, training stream
# ----------------------------------------------------------------------------------------

def chosen_categories(args, dataset):
    if args.category and args.categories:
        raise cli.UserError("give --category (one model per category) or --categories (unified), not both")
    if args.categories:
        names = cli.parse_list(args.categories)
        for name in names:
            dataset.class_id(name)  # UserError if missing
        return names
    if args.category:
        dataset.class_id(args.category)
        return [args.category]
    if len(dataset.categories) == 1:
        return list(dataset.categories)
    raise cli.UserError(f"--category is needed: {args.data!r} has {', '.join(dataset.categories)}")


def load_afs(path, categories, input_size, backbone_identity):
    """The AFS file, refused (one line) when made for another category, size or backbone."""
    afs = load_checkpoint(path, "--afs", kind="afs")
    if afs.get("category") not in categories:
        raise cli.UserError(f"--afs {path!r} was made for category {afs.get('category')!r}, not "
                            f"{' / '.join(categories)}: run select_features.py for this category")
    if input_size is not None and afs["input_size"] != input_size:
        raise cli.UserError(f"--afs {path!r} was made at input size {afs['input_size']}, not --input-size "
                            f"{input_size}: run select_features.py with --input-size {input_size}")
    if backbone_identity is not None and not same_backbone(afs.get("backbone"), backbone_identity):
        raise cli.UserError(f"--afs {path!r} was made with backbone {describe_backbone(afs.get('backbone'))}, not "
                            f"{describe_backbone(backbone_identity)}: give the same --backbone-weights")
    return afs


def same_backbone(a, b):
    return bool(a) and bool(b) and a.get("arch") == b.get("arch") and a.get("digest") == b.get("digest")


def describe_backbone(identity):
    if not identity:
        return "an unknown backbone"
    return f"{identity.get('arch')} weights {identity.get('weights')!r} (digest {identity.get('digest')})"


class UnifiedStream(anomaly.AnomalyStream):
    """AnomalyStream over several categories: each image gets its own category's
    synthesizer (foreground rule, SDAS folder). Same determinism: sample g is a pure
    function of (seed, g)."""

    def __init__(self, samples, size, synthesizers, seed=0, normal_ratio=0.5):
        super().__init__(samples, size, None, seed, normal_ratio)
        self.synthesizers = synthesizers

    def raw(self, g):
        self.synthesizer = self.synthesizers[self.samples[self.image_index(g)].category]
        return super().raw(g)


def make_stream(samples, categories, dataset, args, size, seed):
    def synthesizer(category):
        sdas = os.path.join(args.sdas, category) if args.sdas and len(categories) > 1 else args.sdas
        return anomaly.AnomalySynthesizer(category, dataset.format, size, sdas, args.dtd, args.foreground)
    if len(categories) == 1:
        return anomaly.AnomalyStream(samples, size, synthesizer(categories[0]), seed, args.normal_ratio)
    return UnifiedStream(samples, size, {c: synthesizer(c) for c in categories}, seed, args.normal_ratio)


def split_validation(samples, fraction, seed):
    """Hold out a share of the training images (never test images) for checkpoint choice."""
    if fraction <= 0:
        return samples, []
    if fraction >= 1:
        raise cli.UserError(f"--val-fraction must be below 1, got {fraction}")
    n_val = max(1, int(round(fraction * len(samples))))
    if n_val >= len(samples):
        raise cli.UserError(f"--val-fraction {fraction} leaves no training images ({len(samples)} in all)")
    held_out = set(np.random.default_rng([seed, 7]).choice(len(samples), n_val, replace=False).tolist())
    return ([s for i, s in enumerate(samples) if i not in held_out],
            [s for i, s in enumerate(samples) if i in held_out])


# ----------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------

class FeatureCache:
    """AFS features of every clean training image, computed once in fixed chunks.

    Exact, not an approximation: the backbone is frozen (eval mode) and the training images
    are not augmented, so phi(I) is the same every epoch. Normal samples (half the batch)
    and every reconstruction target then cost nothing; only the synthetic anomalies go
    through the backbone. Computing it in fixed chunks at start-up keeps a resumed run
    bit-identical to an uninterrupted one."""

    def __init__(self, stream, backbone, model, device, chunk=16):
        self.levels = None
        n = len(stream.samples)
        for start in range(0, n, chunk):
            images = torch.stack([data.to_tensor(stream.clean_image(i)) for i in range(start, min(n, start + chunk))])
            feats = model.select_features(backbone(images.to(device)))
            if self.levels is None:
                self.levels = [torch.empty((n, *f.shape[1:]), dtype=f.dtype, device=device) for f in feats]
            for cache, f in zip(self.levels, feats):
                cache[start:start + len(f)] = f

    def __call__(self, index):
        return [cache[index] for cache in self.levels]


def cache_bytes(config, n_images):
    size = config["input_size"]
    strides = dict(zip(config["layers"], config["layer_strides"]))
    dims = dict(zip(config["layers"], config["afs_dims"]))
    per_image = sum(sum(dims[l] for l in group) * (size // strides[group[0]]) ** 2 for group in config["levels"])
    return 4 * per_image * n_images


@torch.no_grad()
def batch_features(batch, backbone, model, cache, device):
    """(input features of the possibly anomalous images, features of their clean originals),
    one tensor per level. A normal sample's clean image is its input: its features are
    computed once, and the backbone only sees the anomalous half twice (or, with the
    cache, only once)."""
    images = batch["image"].to(device, non_blocking=True)
    anomalous = batch["anomalous"].to(device)
    rows = anomalous.nonzero()[:, 0]
    if cache is not None:
        clean = cache(batch["index"].to(device))
        inputs = [c.clone() for c in clean]
        if len(rows):
            for f, a in zip(inputs, model.select_features(backbone(images[rows]))):
                f[rows] = a
        return inputs, clean
    inputs = model.select_features(backbone(images))
    clean = [f.clone() for f in inputs]
    if len(rows):
        for c, f in zip(clean, model.select_features(backbone(batch["clean"].to(device)[rows]))):
            c[rows] = f
    return inputs, clean


# ----------------------------------------------------------------------------------------
# Validation on held-out training images (never the test set)
# ----------------------------------------------------------------------------------------

def make_validation_set(stream, n_images):
    """Fixed samples: every held-out image once normal and once with a synthetic anomaly."""
    items = [stream[g] for g in range(2 * n_images)]
    return {key: torch.stack([it[key] for it in items]) for key in ("image", "mask")} | \
        {"anomalous": torch.tensor([it["anomalous"] for it in items])}


@torch.no_grad()
def validate(model, backbone, val, device, batch_size):
    was_training = model.training
    model.eval()
    maps = []
    for start in range(0, len(val["image"]), batch_size):
        images = val["image"][start:start + batch_size].to(device)
        out = model(model.select_features(backbone(images)), images.shape[-2:])
        maps.append(out["anomaly_map"].float().cpu())
    model.train(was_training)
    maps = torch.cat(maps).numpy()
    masks = val["mask"][:, 0].numpy()
    labels = masks.reshape(len(masks), -1).max(axis=1) > 0
    return {"pixel_auroc": metrics.pixel_auroc(maps, masks), "au_pro": metrics.au_pro(maps, masks),
            "image_auroc": metrics.image_auroc(labels, metrics.image_scores(maps))}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_learning_curve(out):
    """OUT/learning_curve.png: the held-out validation metrics (top) and the training loss
    (bottom) against the step, from val.jsonl and loss.jsonl."""
    val, loss = read_jsonl(os.path.join(out, "val.jsonl")), read_jsonl(os.path.join(out, "loss.jsonl"))
    names = {"pixel_auroc": "pixel AUROC", "au_pro": "AU-PRO", "image_auroc": "image AUROC"}
    top = viz.line_chart({label: ([e["step"] for e in val], [e.get(key) for e in val]) for key, label in names.items()},
                         "validation on held-out TRAINING images with synthetic anomalies (never the test set)",
                         "step", "metric", y_range=(0.0, 1.0))
    bottom = viz.line_chart({label: ([e["step"] for e in loss], [e[key] for e in loss]) for key, label in
                             (("loss", "loss"), ("segmentation", "segmentation (CE)"),
                              ("reconstruction", "reconstruction (MSE)"))},
                            "training loss", "step", "loss")
    atomic_save_image(viz.to_pil(np.concatenate([top, bottom])), os.path.join(out, "learning_curve.png"))


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

def rng_states():
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def model_file(model, run, step, selected_on, extra=None):
    """What evaluate.py reads: everything needed to rebuild the model, no backbone weights
    (they are reloaded from --backbone-weights and checked against `backbone`)."""
    return {"kind": "realnet", "version": 1, "config": model.config, "state_dict": model.state_dict(),
            "step": step, "selected_on": selected_on, "backbone": model.config["backbone"], **run, **(extra or {})}


def read_log(path, last_step):
    """Loss-log lines up to last_step (a resumed run rewrites what came after its state)."""
    if not os.path.isfile(path):
        return []
    lines = []
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut by a kill
                continue
            if entry.get("step", 0) <= last_step:
                lines.append(json.dumps(entry, sort_keys=True))
    return lines


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    info = distributed.setup(args.device)
    device = info.device
    if args.batch < 1 or args.batch % info.world_size:
        raise cli.UserError(f"--batch {args.batch} must be a positive multiple of the {info.world_size} processes")
    dataset = data.open_dataset(args.data, args.format)
    categories = chosen_categories(args, dataset)
    out = args.out or os.path.join("runs", "_".join(categories), "realnet")

    # what the model is built from: the AFS file and the backbone it was made with
    afs_preview = load_checkpoint(args.afs, "--afs", kind="afs")
    weights = args.backbone_weights or (afs_preview.get("backbone") or {}).get("weights", "imagenet")
    backbone = load_backbone(weights, afs_preview["layers"]).to(device)
    afs = load_afs(args.afs, categories, args.input_size, backbone.identity)
    size = afs["input_size"]
    config = build_config(afs, args.arch, args.width_ratio, args.retention, args.k_max, args.k_mean, size,
                          strides=backbone.strides)
    config["backbone"] = backbone.identity

    samples = [s for c in categories for s in dataset.train(c)]
    samples, held_out = split_validation(samples, args.val_fraction, args.seed)
    stream = make_stream(samples, categories, dataset, args, size, args.seed)
    steps_per_epoch = math.ceil(len(samples) / args.batch)
    total_steps = args.steps if args.steps is not None else args.epochs * steps_per_epoch
    # the settings a resumed run must share with the run it continues
    run = {"categories": categories, "dataset": dataset.describe(), "unified": len(categories) > 1,
           "afs": {"digest": file_digest(args.afs), "category": afs["category"]},
           "anomaly_source": {"sdas": args.sdas and os.path.abspath(args.sdas),
                              "dtd": args.dtd and os.path.abspath(args.dtd), "foreground": args.foreground,
                              "normal_ratio": args.normal_ratio},
           "training": {"batch": args.batch, "lr": args.lr, "seed": args.seed, "train_images": len(samples),
                        "val_fraction": args.val_fraction, "val_metric": args.val_metric}}

    cli.seed_everything(args.seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    model = RealNet(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start_step, best = 0, {"value": None, "step": None}
    state_path = os.path.join(out, "state.pt")
    if args.resume and not os.path.isfile(state_path):
        print(f"--resume: no {state_path} yet, starting from step 0")
    elif args.resume:
        state = load_checkpoint(state_path, "--resume", kind="realnet_state")
        for key, what in (("config", "model configuration"), ("run", "training settings")):
            before, now = state[key], config if key == "config" else run
            if before != now:
                diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
                raise cli.UserError(f"--resume: {state_path!r} was made with another {what} "
                                    f"(differs in {', '.join(diff)}); use the same arguments or another --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_states(state["rng"])
        start_step, best = state["step"], state["best"]
    elif os.path.exists(state_path):
        raise cli.UserError(f"{out!r} already holds a training state (state.pt); pass --resume to continue it "
                            "or choose another --out")
    if info.is_main:
        os.makedirs(out, exist_ok=True)
        cli.save_args(args, out)
    distributed.barrier(info)

    ddp_model = model
    if info.enabled:
        model.set_process_group(dist.group.WORLD)  # RRS and BatchNorm see the global batch
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    use_cache = args.cache_features == "on" or (args.cache_features == "auto" and
                                                cache_bytes(config, len(samples)) < 4 * 2 ** 30)
    cache = FeatureCache(stream, backbone, model, device) if use_cache else None
    val = make_validation_set(make_stream(held_out, categories, dataset, args, size, args.seed + 1),
                              len(held_out)) if held_out and info.is_main else None

    if info.is_main:
        print(f"{describe(config)}; {count_parameters(model) / 1e6:.2f} M trainable parameters")
        print(f"training on {len(samples)} images of {', '.join(categories)}"
              f"{' (UNIFIED: one model for all)' if len(categories) > 1 else ''}"
              f"{f', {len(held_out)} held out for checkpoint choice' if held_out else ''}; "
              f"{total_steps} steps of {args.batch} ({total_steps / steps_per_epoch:.1f} epochs), "
              f"{info.world_size} process(es) on {device}, clean-image features {'cached' if cache else 'computed'}")
        if args.dump and start_step == 0:
            written = anomaly.dump_examples(stream, args.dump, os.path.join(out, "examples"))
            print(f"wrote {args.dump} example training pairs to {os.path.join(out, 'examples')} ({written[-1]})")

    log_path = os.path.join(out, "loss.jsonl")
    val_log_path = os.path.join(out, "val.jsonl")
    if info.is_main:
        for path in (log_path, val_log_path):  # a resumed run rewrites what came after its state
            kept = read_log(path, start_step)
            atomic_write_text(path, "".join(line + "\n" for line in kept))
    loader = torch.utils.data.DataLoader(
        stream, batch_size=args.batch // info.world_size, num_workers=args.workers,
        pin_memory=device.type == "cuda",
        sampler=anomaly.StreamSampler(start_step, total_steps, args.batch, info.rank, info.world_size))
    progress = Progress(total_steps, "train", unit="img", every=args.log_every, start_step=start_step,
                        enabled=info.is_main)

    extra = {"args": cli.args_to_dict(args), "afs_path": os.path.abspath(args.afs)}
    last_saved = {"step": None}

    def save(step):
        last_saved["step"] = step
        if not info.is_main:
            return
        selected_on = {"rule": "last step", "step": step}
        atomic_torch_save(model_file(model, run, step, selected_on, extra), os.path.join(out, "model.pt"))
        atomic_torch_save({"kind": "realnet_state", "version": 1, "config": config, "run": run, "step": step,
                           "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_states(),
                           "best": best}, state_path)

    model.train()
    step = start_step
    started = time.time()
    with open(log_path, "a") if info.is_main else open(os.devnull, "w") as log:
        for batch in loader:
            inputs, clean = batch_features(batch, backbone, model, cache, device)
            output = ddp_model(inputs, tuple(batch["image"].shape[-2:]))
            loss, parts = realnet_loss(output, clean, batch["mask"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1

            if step % args.log_every == 0 or step == total_steps:
                values = torch.stack([loss.detach(), parts["segmentation"], parts["reconstruction"]])
                values = distributed.all_reduce_mean(values, info).tolist()
                progress.update(step, items=args.batch, loss=values[0], seg=values[1], rec=values[2])
                log.write(json.dumps({"step": step, "loss": values[0], "segmentation": values[1],
                                      "reconstruction": values[2], "elapsed_s": round(time.time() - started, 2)},
                                     sort_keys=True) + "\n")
                log.flush()
            else:
                progress.update(step, items=args.batch)

            if val is not None and (step % args.val_every == 0 or step == total_steps):
                scores = validate(model, backbone, val, device, args.batch)
                value = scores[args.val_metric]
                with open(val_log_path, "a") as f:
                    f.write(json.dumps({"step": step, **scores}, sort_keys=True) + "\n")
                write_learning_curve(out)
                print(f"validation on {len(held_out)} held-out training images at step {step}: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if v is not None))
                if value is not None and (best["value"] is None or value > best["value"]):
                    best = {"value": value, "step": step}
                    selected_on = {"rule": f"best {args.val_metric} on held-out TRAINING images with synthetic "
                                           "anomalies (never the test set)", "step": step, "scores": scores,
                                   "held_out_images": [s.image for s in held_out]}
                    atomic_torch_save(model_file(model, run, step, selected_on, extra), os.path.join(out, "best.pt"))
            if step % args.save_every == 0 or step == total_steps:
                save(step)
    if last_saved["step"] != step:  # e.g. --steps 0: the untrained model, for comparison
        save(step)
    distributed.barrier(info)
    if info.is_main:
        print(f"done: {step} steps in {time.time() - started:.0f} s; model {os.path.join(out, 'model.pt')}"
              + (f", best.pt from step {best['step']} ({args.val_metric} {best['value']:.4f})"
                 if best["step"] else ""))
    distributed.cleanup(info)


if __name__ == "__main__":
    cli.run(main)
