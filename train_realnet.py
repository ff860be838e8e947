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
8 minutes on 2 CPU cores in bf16; weave reaches image AUROC 1.000, pixel AUROC 0.999),
after demo.sh's stages 1-3:

    python3 train_realnet.py --afs runs/demo/weave/afs.pt --width-ratio 0.25 --batch-size 8 \\
        --steps 1500 --lr 1e-3 --lr-schedule cosine --val-fraction 0.1 --val-every 100 \\
        --anomaly-map fused --precision bf16 --out runs/demo/weave/realnet
    torchrun --nproc_per_node 2 train_realnet.py ...   # DDP: the same model as one process

Writes to --out: model.pt (what evaluate.py reads), state.pt (everything needed to
continue: --resume), loss.jsonl, args.json, and with --val-fraction best.pt, val.jsonl and
learning_curve.png (the held-out metrics and the loss against the step). With
--val-fraction, once training is over, model.pt and best.pt are calibrated on the held-out
normal images (realnet/calibration.py: the fused map's scale and the OK/NG thresholds that
evaluate.py --predict decides with), in the precision evaluate.py will run
(--calibrate-precision).
One model over several categories (`--categories a,b,c`, "unified") is an option beyond the
paper, which trains one model per category.
"""
import argparse
import math
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from realnet import calibration, cli, distributed, precision, runs
from realnet.features import FeatureExtractor, make_cache, pair_features
from realnet.files import atomic_torch_save, file_digest, load_checkpoint
from realnet.files import prepare_output_folder
from realnet.loaders import capped_workers
from realnet.model import ANOMALY_MAPS, ARCHITECTURES, RealNet, build_config, count_parameters
from realnet.model import describe
from realnet.model import realnet_loss
from realnet.progress import Progress
from realnet.stream import AnomalyStream, StreamSampler, dump_examples
from realnet.synthesis import synthesizers_for
from realnet.validation import VAL_LOG, learning_check, make_validation_set, split_validation
from realnet.validation import validation_maps, validation_metrics, write_learning_curve


def parse_args(argv=None):
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
    add("--lr-schedule", default="constant", choices=["constant", "cosine"],
        help="constant (paper) | cosine: decay to 0 over the run (stabler last step, short runs)")
    add("--epochs", type=int, default=1000, help="passes over the training images (paper)")
    add("--steps", type=int, default=None, help="optimiser steps; overrides --epochs")
    add("--seed", type=int, default=0, help="model init, data order and synthetic anomalies")
    precision.add_precision_arg(p, "the backbone, UNets and discriminator")
    add("--val-fraction", type=float, default=0.0,
        help="hold out this share of the TRAINING images to choose the checkpoint on (0: last)")
    add("--val-every", type=int, default=500, help="steps between validations (--val-fraction)")
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
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Inputs: what the AFS file decided
# ----------------------------------------------------------------------------------------

def check_args(args, ddp):
    """What would make a run learn nothing, refused before any work."""
    distributed.require_divisible_batch(args.batch_size, ddp)
    cli.require_positive(epochs=args.epochs, save_every=args.save_every,
                         val_every=args.val_every, log_every=args.log_every,
                         **({} if args.steps is None else {"steps": args.steps}))
    cli.require_non_negative(workers=args.workers, dump=args.dump)
    cli.require_finite_positive(lr=args.lr, width_ratio=args.width_ratio)
    if not 0 <= args.retention <= 1:
        raise cli.UserError(f"--retention must be in [0, 1], got {args.retention}")
    if not 0 <= args.normal_ratio < 1:
        raise cli.UserError(f"--normal-ratio must be in [0, 1) (1 leaves no synthetic anomaly "
                            f"to learn from), got {args.normal_ratio}")
    if not 0 <= args.val_fraction < 1:
        raise cli.UserError(f"--val-fraction must be in [0, 1) (a share of the training "
                            f"images), got {args.val_fraction}")
    precision.check_precision(args.precision, ddp.device)
    precision.check_precision(args.calibrate_precision, ddp.device, "--calibrate-precision")
    if not 0 <= args.target_fpr < 1:
        raise cli.UserError(f"--target-fpr must be in [0, 1), got {args.target_fpr}")
    if args.anomaly_map == "fused" and args.val_fraction <= 0:
        raise cli.UserError("--anomaly-map fused is calibrated on held-out normal images: "
                            "give --val-fraction > 0 (e.g. 0.1)")
    args.workers = capped_workers(args.workers, args.steps)   # no more than can help


def fill_from_afs(args, afs):
    """Stage 3 chose the anomaly source and input size: take them from the AFS file where
    no flag is given. A flag that differs is used, with a note (AFS chose its channels with
    the file's settings); another --input-size is refused."""
    source = afs.get("anomaly_source") or {}
    recorded = {"sdas": None if args.categories else source.get("sdas_dir"),   # unified: DIR/<c>
                "dtd": source.get("dtd_dir"), "foreground": source.get("foreground", "category")}
    for name, value in recorded.items():
        given = getattr(args, name)
        if given is None:
            setattr(args, name, value)
        elif value is not None and given != value and os.path.abspath(str(given)) != value:
            print(f"note: {cli.flag(name)} {given} differs from the AFS file's {value}")
    if args.input_size not in (None, afs["input_size"]):
        raise cli.UserError(f"--afs {args.afs!r} was made at input size {afs['input_size']}, not "
                            f"--input-size {args.input_size}: run select_features.py with "
                            f"--input-size {args.input_size}")
    args.input_size = afs["input_size"]


def chosen_categories(category, categories, afs_category, dataset, afs_path):
    """--category (one model, the paper) or --categories (unified); default the AFS file's."""
    if category and categories:
        raise cli.UserError("give --category (one model per category) or --categories "
                            "(unified), not both")
    names = cli.parse_list(categories) if categories else [category or afs_category]
    for name in names:
        dataset.class_id(name)   # UserError if missing
    if afs_category not in names:
        raise cli.UserError(f"--afs {afs_path!r} was made for category {afs_category!r}, not "
                            f"{' / '.join(names)}: run select_features.py for this category")
    return names


def open_inputs(args, device):
    """Read the AFS file once; from it (and the flags): the data set, the categories, the
    frozen backbone and the model configuration. `args` is completed with the values taken
    from the AFS file, so that args.json says what the run used."""
    afs = load_checkpoint(args.afs, "--afs", kind="afs")
    fill_from_afs(args, afs)
    what = f"--afs {args.afs!r}"
    dataset = runs.open_recorded_dataset(args.data, args.format, afs.get("dataset"), what)
    args.data, args.format = dataset.root, dataset.format
    categories = chosen_categories(args.category, args.categories, afs.get("category"), dataset,
                                   args.afs)
    backbone = runs.load_recorded_backbone(afs.get("backbone"), args.backbone_weights,
                                           afs["layers"], what)
    config = build_config(afs, args.arch, args.width_ratio, args.retention, args.k_max,
                          args.k_mean, args.input_size, strides=backbone.strides,
                          anomaly_map=args.anomaly_map)
    return afs, dataset, categories, backbone.to(device), config | {"backbone": backbone.identity}


def run_settings(args, afs, dataset, categories, train_images):
    """The settings a resumed run must share with the run it continues."""
    path = lambda folder: folder and os.path.abspath(folder)
    return {"categories": categories, "unified": len(categories) > 1,
            "dataset": dataset.describe(),
            "afs": {"digest": file_digest(args.afs), "category": afs["category"]},
            "anomaly_source": {"--sdas": path(args.sdas), "--dtd": path(args.dtd),
                               "--foreground": args.foreground,
                               "--normal-ratio": args.normal_ratio},
            # by flag name, so that a refused --resume names the flag that changed
            "training": {"--batch-size": args.batch_size, "--lr": args.lr,
                         "--lr-schedule": args.lr_schedule, "--seed": args.seed,
                         "--precision": args.precision,
                         "train_images": train_images, "--val-fraction": args.val_fraction,
                         "--val-metric": args.val_metric},
            "calibration_settings": {"--threshold-rule": args.threshold_rule,
                                     "--target-fpr": args.target_fpr,
                                     "--calibrate-precision": args.calibrate_precision}}


# ----------------------------------------------------------------------------------------
# The model, its checkpoints and resuming
# ----------------------------------------------------------------------------------------

def build_model(config, lr, seed, resume_flag, run, out, ddp, scaler):
    """The model (seeded), its optimiser, where a resumed run left off, and the model the
    loop calls (DDP-wrapped under torchrun): (model, ddp_model, optimizer, step, best).
    `scaler` (fp16 loss scaling) continues from the saved state too."""
    cli.seed_everything(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    model = RealNet(config).to(ddp.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    state = runs.load_state(out, resume_flag, "realnet_state")
    step, best = resume(state, model, optimizer, scaler, run, out)
    ddp_model = model
    if ddp.enabled:
        model.set_process_group(torch.distributed.group.WORLD)   # RRS, BatchNorm: global batch
        device_ids = [ddp.device.index] if ddp.device.type == "cuda" else None
        ddp_model = DistributedDataParallel(model, device_ids=device_ids)
    return model, ddp_model, optimizer, step, best


def require_finite(loss, step, lr, out, ddp):
    """Stop every process together when the loss is not finite; nothing is saved from here
    on, so OUT keeps the last good state."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if distributed.all_reduce_mean(finite, ddp).item() < 1:
        raise cli.UserError(f"step {step}: the loss is not finite ({loss.item()}); lower --lr "
                            f"(now {lr}); {out} keeps the last saved step")


def learning_rate(lr, schedule, step, total_steps):
    """The rate for optimiser step `step` (0-based): constant, or cosine from lr down to 0.
    A pure function of the step, so a resumed run needs no scheduler state."""
    if schedule == "constant" or total_steps <= 0:
        return lr
    return 0.5 * lr * (1 + math.cos(math.pi * step / total_steps))


def training_loader(stream, start_step, total_steps, batch_size, workers, ddp):
    """This process's share (batch_size / processes) of each global batch, from start_step."""
    sampler = StreamSampler(start_step, total_steps, batch_size, ddp.rank, ddp.world_size)
    return torch.utils.data.DataLoader(stream, batch_size=batch_size // ddp.world_size,
                                       num_workers=workers, sampler=sampler,
                                       pin_memory=ddp.device.type == "cuda")


def resume(state, model, optimizer, scaler, run, out):
    """Continue from a state made with the same model and training settings: (step, best)."""
    if state is None:
        return 0, {"value": None, "step": None}
    path = os.path.join(out, runs.STATE_FILE)
    for saved, now, what in ((state["config"], model.config, "another model configuration"),
                             (state["run"], run, "other training settings")):
        runs.require_same_settings(saved, now, f"--resume: {path!r} was made with {what}",
                                   "use the same arguments or another --out")
    runs.restore_training(model, optimizer, state)   # the model is on its device already
    if state.get("scaler"):   # fp16 only; the run settings make sure the precision is the same
        scaler.load_state_dict(state["scaler"])
    runs.restore_rng(state["rng"])
    return state["step"], state["best"]


def model_file(model, run, step, selected_on, extra):
    """What evaluate.py reads: everything needed to rebuild the model, no backbone weights
    (they are reloaded from --backbone-weights and checked against `backbone`)."""
    return {"kind": "realnet", "version": 1, "config": model.config, "step": step,
            "state_dict": model.state_dict(), "selected_on": selected_on,
            "backbone": model.config["backbone"], "calibration": None,   # set after training
            **run, **extra}


def save_run(out, model, optimizer, scaler, run, step, best, extra):
    """model.pt (the last step) and state.pt (everything --resume needs), both atomic."""
    last = {"rule": "last step", "step": step}
    atomic_torch_save(model_file(model, run, step, last, extra), os.path.join(out, "model.pt"))
    atomic_torch_save({"kind": "realnet_state", "version": 1, "config": model.config, "run": run,
                       "step": step, "model": model.state_dict(), "best": best,
                       "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                       "rng": runs.rng_state()},
                      os.path.join(out, runs.STATE_FILE))


def validate_and_keep_best(model, features, val, held_out, step, best, metric, batch_size, run,
                           extra, out):
    """Validate on the held-out training images (the discriminator's map against their
    synthetic anomalies), log to val.jsonl and draw the learning curve; best.pt: the best
    step. Returns best."""
    maps = validation_maps(model, features, val, next(model.parameters()).device, batch_size)
    scores = validation_metrics(maps, val)
    with open(os.path.join(out, VAL_LOG), "a") as f:
        runs.log_line(f, {"step": step, **scores})
    write_learning_curve(out)
    print(f"validation on {len(held_out)} held-out training images at step {step}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if v is not None))
    value = scores[metric]
    if value is None or (best["value"] is not None and value <= best["value"]):
        return best
    selected_on = {"rule": f"best {metric} on held-out TRAINING images with synthetic anomalies "
                           "(never the test set)", "step": step, "scores": scores,
                   "held_out_images": [s.image for s in held_out],
                   "validation_samples": {"normal": int((~val["anomalous"]).sum()),
                                          "synthetic_anomaly": int(val["anomalous"].sum()),
                                          "distinct_images": val["distinct"]}}
    atomic_torch_save(model_file(model, run, step, selected_on, extra),
                      os.path.join(out, "best.pt"))
    return {"value": value, "step": step}


def calibrate_checkpoints(out, config, features, val, args, device):
    """Calibration, once training is over (realnet/calibration.py): model.pt and best.pt
    each get the fused map's scale and the OK/NG thresholds of their own weights, fitted on
    the held-out normal images (each once) in --calibrate-precision. Returns
    {file name: calibration record}."""
    def good():   # the held-out images as they are, each once
        return (val["normal"][i:i + args.batch_size]
                for i in range(0, len(val["normal"]), args.batch_size))

    def synthetic():   # for rule f1 only: the held-out samples with a synthetic anomaly
        images = val["image"][val["anomalous"]]
        return (images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size))

    records, learned = {}, learning_check(out)
    for name in ("best.pt", "model.pt"):
        path = os.path.join(out, name)
        if not os.path.exists(path):
            continue
        checkpoint = load_checkpoint(path, name, kind="realnet")
        model = RealNet(config).to(device)
        model.load_state_dict(checkpoint["state_dict"])
        record = calibration.calibrate(
            model, FeatureExtractor(features.backbone, model), good, device, args.threshold_rule, args.target_fpr,
            args.calibrate_precision, synthetic if args.threshold_rule == "f1" else None,
            source=f"{len(val['normal'])} held-out TRAINING images of --val-fraction "
                   f"{args.val_fraction} (never the test set)")
        checkpoint["state_dict"] = model.state_dict()
        checkpoint["calibration"], checkpoint["learning_check"] = record, learned
        atomic_torch_save(checkpoint, path)
        records[name] = record
    return records


# ----------------------------------------------------------------------------------------
# What the loop prints
# ----------------------------------------------------------------------------------------

def print_plan(config, model, categories, n_images, held_out, total_steps, batch_size, ddp, cache):
    epochs = total_steps / math.ceil(n_images / batch_size)
    unified = " (UNIFIED: one model for all)" if len(categories) > 1 else ""
    held = (f", {len(held_out)} held out for checkpoint choice and calibration"
            if held_out else "")
    print(f"{describe(config)}; {count_parameters(model) / 1e6:.2f} M trainable parameters")
    print(f"training on {n_images} images of {', '.join(categories)}{unified}{held}; "
          f"{total_steps} steps of {batch_size} ({epochs:.1f} epochs), {ddp.world_size} "
          f"process(es) on {ddp.device}, clean-image features {'cached' if cache else 'computed'}")


def print_done(step, started, out, best, metric, records, validated):
    note = ""
    if best["step"]:
        note = f", best.pt from step {best['step']} ({metric} {best['value']:.4f})"
    print(f"done: {step} steps in {time.time() - started:.0f} s; model "
          f"{os.path.join(out, 'model.pt')}{note}")
    if not records:
        print("not calibrated: " + ("no held-out image" if validated else
                                    "give --val-fraction > 0 (held-out images)")
              + "; no OK/NG threshold stored (python3 -m realnet.calibration makes one)")
        return
    for name, record in records.items():   # best.pt first: what the README evaluates
        print(f"{name}: {calibration.describe(record)}")
    for note in dict.fromkeys(n for record in records.values() for n in record["notes"]):
        print("note: " + note)
    warning = (learning_check(out) or {}).get("warning")
    if warning:
        print("WARNING: " + warning)


def write_examples(stream, n, folder):
    """--dump N: the first N training pairs as pictures (what the model learns from)."""
    if n:
        written = dump_examples(stream, n, folder)
        print(f"wrote {n} example training pairs to {folder} ({written[-1]})")


def log_losses(log, progress, step, batch_size, loss, parts, ddp, started):
    """The losses averaged over the processes: a progress line and a loss.jsonl entry."""
    values = torch.stack([loss.detach(), parts["segmentation"], parts["reconstruction"]])
    loss, seg, rec = distributed.all_reduce_mean(values, ddp).tolist()
    progress.update(step, items=batch_size, loss=loss, seg=seg, rec=rec)
    runs.log_line(log, {"step": step, "loss": loss, "segmentation": seg, "reconstruction": rec,
                        "elapsed_s": round(time.time() - started, 2)})


# ----------------------------------------------------------------------------------------
# Main: set-up, then the loop (step, log, validate, save)
# ----------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    ddp = distributed.setup(args.device)
    check_args(args, ddp)
    afs, dataset, categories, backbone, config = open_inputs(args, ddp.device)
    samples, held_out = split_validation([s for c in categories for s in dataset.train(c)],
                                         args.val_fraction, args.seed)
    synthesizers = synthesizers_for(categories, dataset.format, args.input_size, args.sdas,
                                    args.dtd, args.foreground)
    stream = AnomalyStream(samples, args.input_size, synthesizers, args.seed, args.normal_ratio)
    steps_per_epoch = math.ceil(len(samples) / args.batch_size)
    total_steps = args.steps if args.steps is not None else args.epochs * steps_per_epoch
    out = args.out or os.path.join("runs", "_".join(categories), "realnet")
    prepare_output_folder(out, clean=ddp.is_main, files=("model.pt", "state.pt", "best.pt",
                                                          "args.json", runs.LOG_FILE),
                          subfolders=("examples",))
    run = run_settings(args, afs, dataset, categories, len(samples))
    extra = {"args": cli.args_to_dict(args), "afs_path": os.path.abspath(args.afs)}
    scaler = precision.grad_scaler(args.precision, ddp.device)
    model, ddp_model, optimizer, start_step, best = build_model(config, args.lr, args.seed,
                                                                args.resume, run, out, ddp, scaler)
    log_path = runs.start_outputs(out, args, start_step) if ddp.is_main else os.devnull
    distributed.barrier(ddp)
    features = FeatureExtractor(backbone, model)
    amp = precision.autocast(args.precision, ddp.device)   # the networks' arithmetic
    with amp:   # the cached features are made in the precision of the anomalous ones
        cache = make_cache(args.cache_features, config, stream, features, ddp.device)
    val = make_validation_set(AnomalyStream(held_out, args.input_size, synthesizers, args.seed + 1,
                                            args.normal_ratio), len(held_out)) \
        if held_out and ddp.is_main else None
    loader = training_loader(stream, start_step, total_steps, args.batch_size, args.workers, ddp)
    progress = Progress(total_steps, "train", unit="img", every=args.log_every,
                        start_step=start_step, enabled=ddp.is_main)
    if ddp.is_main:
        print_plan(config, model, categories, len(samples), held_out, total_steps,
                   args.batch_size, ddp, cache)
        write_examples(stream, args.dump if start_step == 0 else 0, os.path.join(out, "examples"))

    model.train()
    step, saved_step, started = start_step, None, time.time()
    with open(log_path, "a") as log:
        for batch in loader:
            # one step: half normal, half synthetic anomalies; reconstruct, segment, learn
            with amp:
                inputs, clean = pair_features(batch, features, cache, ddp.device)
                output = ddp_model(inputs, tuple(batch["image"].shape[-2:]))
            loss, parts = realnet_loss(output, clean, batch["mask"].to(ddp.device))  # float32
            require_finite(loss, step + 1, args.lr, out, ddp)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()   # scaled in fp16 only
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args.lr, args.lr_schedule, step, total_steps)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            last = step == total_steps

            if step % args.log_every == 0 or last:
                log_losses(log, progress, step, args.batch_size, loss, parts, ddp, started)
            else:
                progress.update(step, items=args.batch_size)
            if val is not None and (step % args.val_every == 0 or last):
                with amp:
                    best = validate_and_keep_best(model, features, val, held_out, step, best,
                                                  args.val_metric, args.batch_size, run, extra,
                                                  out)
            if step % args.save_every == 0 or last:
                if ddp.is_main:
                    save_run(out, model, optimizer, scaler, run, step, best, extra)
                saved_step = step
    if saved_step != step and ddp.is_main:   # a finished run resumed: nothing left to train
        save_run(out, model, optimizer, scaler, run, step, best, extra)
    records = {}
    if ddp.is_main and val is not None:   # after training: what turns maps into verdicts
        records = calibrate_checkpoints(out, config, features, val, args, ddp.device)
    distributed.barrier(ddp)
    if ddp.is_main:
        print_done(step, started, out, best, args.val_metric, records, val is not None)
    distributed.cleanup(ddp)


if __name__ == "__main__":
    cli.run(main)
