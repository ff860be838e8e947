"""Stage 4: train RealNet (paper §3.3-3.4) on one category's normal images.

Each step: half the batch are normal training images, half get a synthetic anomaly
(SDAS and/or DTD, paper eq. 3). The frozen backbone gives features, AFS keeps the channels
chosen by select_features.py, one UNet per level reconstructs them, RRS keeps the residual
channels that carry the anomaly and a small discriminator segments it (docs/method.md):

    loss = CE(logits, mask) + sum_k MSE(G_k(phi_k(A)), phi_k(I))

The AFS file of stage 3 already says which data set, category, anomaly source, input size
and backbone the model is for: they are its defaults (a flag overrides; a flag that would
not fit the AFS file is refused). The paper's setting (one model per category, batch 16,
Adam 1e-4, 1000 epochs):

    python3 train_realnet.py --afs runs/bottle/afs.pt --out runs/bottle/realnet

The demo at small scale (random backbone, layers 1-2 at 128 px, AFS 64/128 channels; about
13 minutes on 2 CPU cores in bf16; weave reaches image AUROC 1.000, pixel AUROC 0.995),
after demo.sh's stages 1-3:

    python3 train_realnet.py --afs runs/demo/weave/afs.pt --width-ratio 0.25 --batch-size 8 \\
        --steps 1500 --lr 1e-3 --lr-schedule cosine --discriminator-lr-scale 3 \\
        --val-fraction 0.1 --val-every 100 --anomaly-map fused --precision bf16 \\
        --out runs/demo/weave/realnet
    torchrun --nproc_per_node 2 train_realnet.py ...   # DDP: the same model as one process

Writes to --out: model.pt (what evaluate.py reads), state.pt (everything needed to continue:
--resume), loss.jsonl, args.json, and with --val-fraction best.pt, val.jsonl and
learning_curve.png (the held-out metrics, on --val-samples synthetic samples, and the loss
against the step). Once training is over, model.pt and best.pt are calibrated on the held-out
normal images (realnet/calibration.py: the fused map's scale and the OK/NG thresholds that
evaluate.py --predict decides with), in the precision evaluate.py will run.
One model over several categories (`--categories a,b,c`, "unified") is an option beyond the
paper, which trains one model per category.
"""

import argparse
import functools
import math
import os
import time
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel

from realnet import afs_file, calibration, checkpoint, cli, distributed, precision, runs
from realnet.features import FeatureExtractor, make_cache, pair_features
from realnet.loaders import capped_workers, training_loader
from realnet.model import ANOMALY_MAPS, ARCHITECTURES, RealNet, count_parameters, describe
from realnet.model import realnet_loss
from realnet.progress import Progress
from realnet.stream import AnomalyStream, write_examples
from realnet.anomalies import synthesizers_for
from realnet import validation
from realnet.rates import learning_rate, parameter_groups, set_learning_rate
from realnet.validation import learning_check, split_validation, validate_and_keep_best


def parse_args(argv=None):
    # fmt: off
    # (a table of flags: one per line, continuation lines aligned under the help text)
    p = argparse.ArgumentParser(description="Stage 4: train RealNet (paper §3.3-3.4).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--afs", required=True, help="AFS file from select_features.py (the kept channels)")
    cli.add_data_args(p, default=None, help="data set root; None: the AFS file's")
    add("--category", default=None, help="the category; None: the AFS file's")
    add("--categories", default=None,
        help="UNIFIED, beyond the paper: one model over these comma-separated categories (the "
             "AFS file made for any one of them; --sdas is then DIR/<category>)")
    cli.add_anomaly_source_args(p, from_afs=True)
    add("--normal-ratio", type=float, default=0.5, help="normal share of every batch (paper)")
    add("--backbone-weights", default=None,
        help="imagenet | PATH.pth | random; None: the weights the AFS file was made with")
    add("--input-size", type=int, default=None, help="image side; None: the AFS file's")
    add("--arch", default="A", choices=sorted(ARCHITECTURES), help="A: one UNet per layer (paper)")
    add("--width-ratio", type=float, default=0.5, help="UNet width / input channels (paper)")
    add("--retention", type=float, default=1 / 3, help="residual channels RRS keeps (paper)")
    add("--k-max", type=int, default=None, help="RRS channels ranked by max (M*retention/2)")
    add("--k-mean", type=int, default=None, help="RRS channels ranked by mean (M*retention/2)")
    add("--anomaly-map", default="discriminator", choices=sorted(ANOMALY_MAPS),
        help="what the model reports: discriminator (the paper: its class-1 probability) | "
             "fused (beyond the paper: the discriminator's log-odds and each level's "
             "reconstruction energy, each scaled on the held-out normal images by calibration, "
             "and averaged; needs --val-fraction)")
    add("--batch-size", type=int, default=16, help="global batch size (paper)")
    add("--lr", type=float, default=1e-4, help="Adam learning rate (paper)")
    add("--discriminator-lr-scale", type=float, default=1.0,
        help="the discriminator's rate = this x --lr (1: the paper; see realnet/rates.py)")
    add("--lr-schedule", default="constant", choices=["constant", "cosine"],
        help="constant (paper) | cosine: decay to 0 over the run (stabler last step, short runs)")
    add("--epochs", type=int, default=1000, help="passes over the training images (paper)")
    add("--steps", type=int, default=None, help="optimiser steps; overrides --epochs")
    add("--seed", type=int, default=0, help="model init, data order and synthetic anomalies")
    precision.add_precision_arg(p, "the backbone, UNets and discriminator")
    add("--val-fraction", type=float, default=0.0,
        help="hold out this share of the TRAINING images to choose the checkpoint on (0: last)")
    add("--val-every", type=int, default=500, help="steps between validations (--val-fraction)")
    add("--val-samples", type=int, default=validation.MIN_VALIDATION_SAMPLES,
        help="synthetic validation samples drawn from the held-out images (at least 2 each)")
    add("--val-metric", default="pixel_auroc", choices=["pixel_auroc", "au_pro", "image_auroc"],
        help="what best.pt maximises on the held-out training images (the discriminator's "
             "map: the synthetic anomalies are what it was trained to find)")
    add("--threshold-rule", default=calibration.DEFAULT_RULE, choices=sorted(calibration.RULES),
        help="the OK/NG threshold calibration stores in model.pt and best.pt, from the held-out "
             "images (--val-fraction): normal (the highest good score plus a margin) | fpr (at "
             "most --target-fpr of the good ones NG) | f1 (F1-optimal vs their synthetic "
             "anomalies: sits high, real defects are fainter)")
    add("--target-fpr", type=float, default=0.01,
        help="with --threshold-rule fpr: the false-positive rate allowed on normal images")
    precision.add_precision_arg(p, "calibration after training: the precision evaluate.py "
                                   "will run in (evaluate.py's default: fp32)",
                                flag="--calibrate-precision")
    add("--cache-features", default="auto", choices=["auto", "on", "off"],
        help="keep the clean images' features (frozen backbone, no augmentation: exact); "
             "auto = on when they take under 4 GiB")
    add("--save-every", type=int, default=500, help="steps between resumable states")
    add("--log-every", type=int, default=10, help="steps between progress lines / log entries")
    cli.add_workers_arg(p)
    cli.add_device_arg(p)
    add("--out", default=None, help="output folder (default runs/<category>/realnet)")
    add("--resume", action="store_true", help="continue from OUT/state.pt")
    add("--dump", type=int, default=0, help="write N example training pairs to OUT/examples")
    # fmt: on
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Inputs: the flags checked, the training stream and the held-out set
# ----------------------------------------------------------------------------------------


def check_args(args, ddp):
    """What would make a run learn nothing, refused before any work."""
    distributed.require_divisible_batch(args.batch_size, ddp)
    cli.require_positive(
        epochs=args.epochs,
        save_every=args.save_every,
        val_every=args.val_every,
        val_samples=args.val_samples,
        log_every=args.log_every,
        **({} if args.steps is None else {"steps": args.steps}),
    )
    cli.require_non_negative(workers=args.workers, dump=args.dump)
    cli.require_finite_positive(
        lr=args.lr,
        discriminator_lr_scale=args.discriminator_lr_scale,
        width_ratio=args.width_ratio,
    )
    if not 0 <= args.retention <= 1:
        raise cli.UserError(f"--retention must be in [0, 1], got {args.retention}")
    if not 0 <= args.normal_ratio < 1:
        raise cli.UserError(
            f"--normal-ratio must be in [0, 1) (1 leaves no synthetic anomaly "
            f"to learn from), got {args.normal_ratio}"
        )
    if not 0 <= args.val_fraction < 1:
        raise cli.UserError(
            f"--val-fraction must be in [0, 1) (a share of the training "
            f"images), got {args.val_fraction}"
        )
    precision.check_precision(args.precision, ddp.device)
    precision.check_precision(args.calibrate_precision, ddp.device, "--calibrate-precision")
    if not 0 <= args.target_fpr < 1:
        raise cli.UserError(f"--target-fpr must be in [0, 1), got {args.target_fpr}")
    if args.anomaly_map == "fused" and args.val_fraction <= 0:
        raise cli.UserError(
            "--anomaly-map fused is calibrated on held-out normal images: "
            "give --val-fraction > 0 (e.g. 0.1)"
        )
    args.workers = capped_workers(args.workers, args.steps)  # no more than can help


def training_stream(args, dataset, categories):
    """The training images less the held-out share, as the stream of training samples (half
    normal, half with a synthetic anomaly): (stream, held-out samples, the synthesizers)."""
    samples, held_out = split_validation(
        [s for c in categories for s in dataset.train(c)], args.val_fraction, args.seed
    )
    synthesizers = synthesizers_for(
        categories, dataset.format, args.input_size, **cli.anomaly_settings(args)
    )
    stream = AnomalyStream(samples, args.input_size, synthesizers, args.seed, args.normal_ratio)
    return stream, held_out, synthesizers


def held_out_set(held_out, synthesizers, args):
    """The validation set of the held-out training images (validation.make_validation_set),
    their synthetic anomalies drawn like the training ones, from a seed of their own."""
    stream = AnomalyStream(
        held_out, args.input_size, synthesizers, args.seed + 1, args.normal_ratio
    )
    return validation.make_validation_set(stream, len(held_out), args.val_samples)


# ----------------------------------------------------------------------------------------
# The model and one training step
# ----------------------------------------------------------------------------------------


def build_model(config, args, run, out, ddp):
    """The model (seeded), its optimiser and loss scaler (fp16 only), where a resumed run left
    off, and the model the loop calls (DDP-wrapped under torchrun):
    (model, net, optimizer, scaler, step, best)."""
    scaler = precision.grad_scaler(args.precision, ddp.device)
    cli.seed_everything(args.seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    model = RealNet(config).to(ddp.device)
    optimizer = torch.optim.Adam(parameter_groups(model, args.discriminator_lr_scale), lr=args.lr)
    state = runs.load_state(out, args.resume, "realnet_state")
    step, best = checkpoint.resume(state, model, optimizer, scaler, run, out)
    net = model
    if ddp.enabled:
        model.set_process_group(torch.distributed.group.WORLD)  # RRS, BatchNorm: global batch
        device_ids = [ddp.device.index] if ddp.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids)
    return model, net, optimizer, scaler, step, best


class Trainer(NamedTuple):
    """What a training step works with."""

    model: torch.nn.Module  # the model the step calls: DDP-wrapped under torchrun
    features: FeatureExtractor  # the frozen backbone, then AFS
    cache: object  # the clean images' features by sample index (make_cache), or None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # scales the loss in fp16 only
    amp: object  # the networks' arithmetic (precision.autocast)
    device: torch.device


def train_step(trainer, batch, lr, check=None, mark=None):
    """One optimiser step (paper §3.3-3.4): the batch is half normal images, half synthetic
    anomalies; the frozen backbone and AFS give features (the clean originals' from the
    cache), the UNets reconstruct them, RRS keeps the residuals that carry the anomaly, the
    discriminator segments; loss = CE(segmentation) + MSE(reconstruction), in float32.
    check(loss) runs before the backward pass; mark(part) after each part (the step
    benchmark's clock). Returns (loss, its parts)."""
    mark = mark or (lambda part: None)
    model, features, cache, optimizer, scaler, amp, device = trainer
    with amp:
        inputs, clean = pair_features(batch, features, cache, device)
        mark("backbone")
        output = model(inputs, tuple(batch["image"].shape[-2:]))
    loss, parts = realnet_loss(output, clean, batch["mask"].to(device))
    mark("head")
    if check is not None:
        check(loss)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # scaled in fp16 only
    mark("backward")
    set_learning_rate(optimizer, lr)
    scaler.step(optimizer)
    scaler.update()
    mark("adam")
    return loss, parts


# ----------------------------------------------------------------------------------------
# Main: what it prints, set-up, then the loop (step, log, validate, save)
# ----------------------------------------------------------------------------------------


def print_plan(args, ddp, model, cache, categories, stream, held_out, total_steps):
    n_images, batch_size = len(stream.samples), args.batch_size
    epochs = total_steps / math.ceil(n_images / batch_size)
    unified = " (UNIFIED: one model for all)" if len(categories) > 1 else ""
    held = f", {len(held_out)} held out for checkpoint choice and calibration" if held_out else ""
    print(f"{describe(model.config)}; {count_parameters(model) / 1e6:.2f} M trainable parameters")
    print(
        f"training on {n_images} images of {', '.join(categories)}{unified}{held}; "
        f"{total_steps} steps of {batch_size} ({epochs:.1f} epochs), {ddp.world_size} "
        f"process(es) on {ddp.device}, clean-image features {'cached' if cache else 'computed'}"
    )


def print_done(step, started, out, best, metric, records, validated):
    note = ""
    if best["step"]:
        note = f", best.pt from step {best['step']} ({metric} {best['value']:.4f})"
    model_path = os.path.join(out, "model.pt")
    print(f"done: {step} steps in {time.time() - started:.0f} s; model {model_path}{note}")
    calibration.report(records, validated, (learning_check(out) or {}).get("warning"))


def main(argv=None):
    args = parse_args(argv)
    ddp = distributed.setup(args.device)
    check_args(args, ddp)
    afs, dataset, categories, backbone, config = afs_file.open_inputs(args, ddp.device)
    stream, held_out, synthesizers = training_stream(args, dataset, categories)
    total_steps = args.steps or args.epochs * math.ceil(len(stream.samples) / args.batch_size)
    out = checkpoint.output_folder(args.out, categories, ddp)
    run = checkpoint.run_settings(args, afs, dataset, categories, len(stream.samples))
    extra = {"args": cli.args_to_dict(args), "afs_path": os.path.abspath(args.afs)}
    model, net, optimizer, scaler, start_step, best = build_model(config, args, run, out, ddp)
    log_path = runs.start_outputs(out, args, start_step) if ddp.is_main else os.devnull
    distributed.barrier(ddp)
    features = FeatureExtractor(backbone, model)
    amp = precision.autocast(args.precision, ddp.device)  # the networks' arithmetic
    with amp:  # the cached features are made in the precision of the anomalous ones
        cache = make_cache(args.cache_features, config, stream, features, ddp.device)
    trainer = Trainer(net, features, cache, optimizer, scaler, amp, ddp.device)
    val = held_out_set(held_out, synthesizers, args) if held_out and ddp.is_main else None
    loader = training_loader(stream, start_step, total_steps, args.batch_size, args.workers, ddp)
    progress = Progress(
        total_steps, "train", every=args.log_every, start_step=start_step, enabled=ddp.is_main
    )
    if ddp.is_main:
        print_plan(args, ddp, model, cache, categories, stream, held_out, total_steps)
        write_examples(stream, args.dump if start_step == 0 else 0, os.path.join(out, "examples"))
    finite = functools.partial(distributed.require_finite, lr=args.lr, out=out, info=ddp)
    save_best = functools.partial(checkpoint.save_best, out, model, run, extra=extra)

    model.train()
    step, started = start_step, time.time()
    with open(log_path, "a") as log:
        for step, batch in enumerate(loader, start=start_step + 1):
            lr = learning_rate(args.lr, args.lr_schedule, step - 1, total_steps)
            loss, parts = train_step(
                trainer, batch, lr, check=functools.partial(finite, step=step)
            )
            last = step == total_steps
            if step % args.log_every == 0 or last:
                runs.log_losses(log, progress, step, args.batch_size, loss, parts, ddp, started)
            else:
                progress.update(step, items=args.batch_size)
            if val is not None and (step % args.val_every == 0 or last):
                with amp:
                    best = validate_and_keep_best(
                        model, features, val, held_out, step, best, args, out, save_best
                    )
            if (step % args.save_every == 0 or last) and ddp.is_main:
                checkpoint.save_run(out, model, optimizer, scaler, run, step, best, extra)
    if ddp.is_main and step == start_step:  # a finished run resumed: nothing left to train
        checkpoint.save_run(out, model, optimizer, scaler, run, step, best, extra)
    records = {}
    if ddp.is_main and val:
        records = calibration.calibrate_checkpoints(out, config, features, val, args, ddp.device)
    distributed.barrier(ddp)
    if ddp.is_main:
        print_done(step, started, out, best, args.val_metric, records, val is not None)
    distributed.cleanup(ddp)


if __name__ == "__main__":
    cli.run(main)
