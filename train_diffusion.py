"""Stage 1 of RealNet: train the class-conditional diffusion model that SDAS samples from.

Paper §3.1 and appendix B: a DDPM (T = 1000, linear betas) with IDDPM's learned variance,
trained on the NORMAL training images with L_simple + L_vlb, Adam 1e-4, EMA 0.9999,
initialised from OpenAI's ImageNet model. As in the authors' code, one model serves all
categories of a data set: the UNet is conditioned on the category id (docs/method.md, "SDAS").

Run (paper scale, all MVTec categories, from OpenAI's weights; 4 GPUs):
    torchrun --nproc_per_node 4 train_diffusion.py --data data/mvtec --preset paper \
        --init-weights pretrain/256x256_diffusion.pt --batch-size 20 --accumulate 3 --steps 50000
Run (the tiny preset on a 2-core CPU, one demo category, ~9 minutes; s = 0 samples are grey
washers on a dark table, s = 0.2 ones grainy and misshapen; --image-size 32: ~3 minutes):
    python3 train_diffusion.py --data data/demo --categories washer --preset tiny --image-size 64 \
        --steps 600 --batch-size 8 --lr 1e-3 --out runs/diffusion_washer
A from-scratch tiny model needs a 10x larger learning rate than the paper's fine-tuning (1e-3,
not 1e-4) to make objects within minutes. On a machine shared with other jobs, run with
OMP_NUM_THREADS=1 (or OMP_WAIT_POLICY=PASSIVE): spinning OpenMP threads made it 2-5x slower here.

Writes to --out:
    model.pt            EMA weights, architecture, schedule, class list (synthesize.py reads it)
    state.pt            everything to continue (--resume): weights, EMA, optimiser, step, RNG, args
    samples/step_N.png  rows: s = 0, 0.1, 0.2 from the same noise, real images, DDIM round trip
    loss.jsonl          loss per logged step;   args.json   the arguments
"""

import argparse
import contextlib
import copy
import os

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from realnet import adm, cli, distributed, runs, viz
from realnet.data import diffusion_training_images, open_dataset
from realnet.diffusion import GaussianDiffusion, default_schedule
from realnet.files import atomic_save_image, prepare_output_folder
from realnet.loaders import start_loader
from realnet.progress import Progress
from realnet.stream import StepBatches, sample_noise


def parse_args(argv=None):
    # fmt: off
    # (a table of flags: one per line, continuation lines aligned under the help text)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    cli.add_data_args(p, default=None, required=True, help="data set root (MVTec, VisA, ...)")
    add("--categories", default=None,
        help="comma-separated categories to train on (default: all, one class-conditional model "
             "as the authors)")
    add("--out", default="runs/diffusion", help="output folder")
    add("--preset", default="paper", choices=sorted(adm.PRESETS), help="UNet size (see adm.py)")
    add("--image-size", type=int, default=None,
        help="training resolution (default: the preset's, 256 paper / 64 tiny)")
    add("--model-channels", type=int, default=None, help="override the preset's base width")
    add("--init-weights", default=None,
        help="initialise from OpenAI's 256x256_diffusion.pt (the paper does; only the label "
             "embedding stays random)")
    add("--steps", type=int, default=50000,
        help="optimiser steps (the authors' MVTec run: about 50k, their issue #47)")
    add("--batch-size", type=int, default=16,
        help="images per forward/backward pass, over all ranks (authors: 5 per GPU x 4 GPUs)")
    add("--accumulate", type=int, default=1,
        help="passes per optimiser step, gradients averaged (authors: 3, 60 images per step)")
    add("--lr", type=float, default=1e-4, help="Adam learning rate (paper: 1e-4, fine-tuning)")
    add("--grad-clip", type=float, default=1.0, help="gradient norm clipping (paper: 1.0)")
    add("--ema", type=float, default=0.9999, help="EMA decay of the weights synthesize.py uses")
    add("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
        help="use min(ema, (1+n)/(10+n)) at update n, so a short run's EMA is not mostly its "
             "random init (0.9999 needs ~10k updates to forget it); --no-ema-warmup is the "
             "authors' plain EMA")
    add("--precision", default="fp32", choices=["fp32", "bf16"],
        help="bf16: autocast the UNet (halves activation memory on a GPU; the authors: fp32)")
    add("--seed", type=int, default=0, help="seed of the init, batches, timesteps and noise")
    add("--log-every", type=int, default=20, help="steps between progress lines")
    add("--sample-every", type=int, default=500, help="steps between sample sheets (0: the end)")
    add("--save-every", type=int, default=500, help="steps between checkpoints (and at the end)")
    add("--sheet-columns", type=int, default=8, help="images per row of a sample sheet")
    add("--sample-steps", type=int, default=20, help="respaced steps of the sheets (synthesize's)")
    cli.add_workers_arg(p, default=None)
    cli.add_device_arg(p)
    add("--resume", action="store_true", help="continue from --out/state.pt")
    args = p.parse_args(argv)
    args.image_size = args.image_size or adm.PRESETS[args.preset]["image_size"]
    # fmt: on
    return args


# What --out holds: checked before anything is loaded (none of them may be a folder).
OUTPUT_FILES = ("model.pt", runs.STATE_FILE, "args.json", runs.LOG_FILE)


def check_args(args):
    """One-line errors for values that cannot work, before anything is loaded."""
    cli.require_positive(steps=args.steps, batch_size=args.batch_size, accumulate=args.accumulate)
    cli.require_positive(image_size=args.image_size, sheet_columns=args.sheet_columns)
    cli.require_positive(
        sample_steps=args.sample_steps, log_every=args.log_every, save_every=args.save_every
    )
    cli.require_non_negative(workers=args.workers, sample_every=args.sample_every)
    cli.require_finite_positive(lr=args.lr, grad_clip=args.grad_clip)  # nan: learns nothing
    if not 0.0 <= args.ema < 1.0:
        raise cli.UserError(f"--ema must be in [0, 1) (got {args.ema})")
    factor = 2 ** (len(adm.PRESETS[args.preset]["channel_mult"]) - 1)
    if args.image_size % factor:
        raise cli.UserError(
            f"--image-size {args.image_size}: must be a multiple of {factor} for "
            f"the {args.preset} preset"
        )
    if args.init_weights and not os.path.isfile(args.init_weights):
        raise cli.UserError(
            f"--init-weights: file {args.init_weights!r} does not exist; download "
            f"OpenAI's class-conditional 256x256 model from {adm.OPENAI_URL} "
            "(e.g. into pretrain/)"
        )


# ----------------------------------------------------------------------------- data
def training_images(args, log):
    """The normal training images of the chosen categories; class id = position in `classes`:
    (index, classes, dataset)."""
    index = open_dataset(args.data, args.format, args.categories)
    classes = list(index.categories)
    dataset = diffusion_training_images(index, args.image_size)
    size = args.image_size
    log(
        f"data: {len(dataset)} normal training images of {len(classes)} categories "
        f"({', '.join(classes)}) from {args.data} ({index.format}), {size}x{size}"
    )
    return index, classes, dataset


def training_batches(dataset, args, start_step, ddp, log):
    """This rank's micro-batches from `start_step` on, the same as an uninterrupted run's (see
    StepBatches); loader processes: --workers, by default 4 with CUDA, 0 on a CPU."""
    workers = args.workers if args.workers is not None else (4 if ddp.device.type == "cuda" else 0)
    sampler = StepBatches(
        len(dataset),
        args.batch_size,
        start_step * args.accumulate,
        args.steps * args.accumulate,
        args.seed,
        ddp.rank,
        ddp.world_size,
    )
    loader = start_loader(dataset, workers, log, batch_sampler=sampler, persistent_workers=True)
    return iter(loader)


# ----------------------------------------------------------------------------- training pieces
@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for parameters and buffers alike."""
    for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        else:
            e.copy_(p)


def ema_decay(ema, warmup, updates):
    """The EMA decay at update n: min(ema, (1+n)/(10+n)) with warm-up, else ema."""
    return min(ema, (1 + updates) / (10 + updates)) if warmup else ema


def accumulate_gradients(net, diffusion, batches, step, args, ddp, sums):
    """Forward and backward over the --accumulate micro-batches of optimiser step `step`,
    gradients averaged; DDP all-reduces once, after the last. Returns `sums` (loss, mse, vb)
    plus theirs."""
    micro_steps = range(step * args.accumulate, (step + 1) * args.accumulate)
    positions = range(ddp.rank, args.batch_size, ddp.world_size)  # this rank's places in a batch
    for i, micro in enumerate(micro_steps):
        x0, y = next(batches)
        t, noise = sample_noise(args.seed, micro, positions, x0.shape[1:], diffusion.num_timesteps)
        x0, y, t, noise = (v.to(ddp.device) for v in (x0, y, t, noise))
        last_micro = i == len(micro_steps) - 1
        with net.no_sync() if ddp.enabled and not last_micro else contextlib.nullcontext():
            bf16 = args.precision == "bf16"
            with torch.autocast(ddp.device.type, dtype=torch.bfloat16, enabled=bf16):
                losses = diffusion.training_losses(net, x0, t, y, noise)
            loss = losses["loss"].mean()
            (loss / len(micro_steps)).backward()
        parts = (loss, losses["mse"].mean(), losses["vb"].mean())
        sums = [s + part.item() for s, part in zip(sums, parts)]
    return sums


@torch.no_grad()
def sample_sheet(ema, sampling, images, class_ids, classes, step, device, path):
    """A PNG that shows at a glance whether the model makes objects or noise:
    rows s = 0, 0.1, 0.2 from the same x_T and the same per-step noise, then real images,
    then their DDIM-inverted noise and the DDIM reconstruction from it (the authors' check:
    training is done when the reconstruction equals the input)."""
    n = len(class_ids)
    y = torch.tensor(class_ids, device=device)
    generator = lambda j: torch.Generator().manual_seed(1000 + j)
    x_T = torch.stack([torch.randn(images.shape[1:], generator=generator(j)) for j in range(n)])
    strengths = (0.0, 0.1, 0.2)
    gens = [torch.Generator().manual_seed(2000 + j) for _ in strengths for j in range(n)]
    s = torch.tensor([v for v in strengths for _ in range(n)])
    x_T = x_T.repeat(len(strengths), 1, 1, 1).to(device)
    samples = sampling.sample(ema, x_T, y.repeat(len(strengths)), strength=s, generators=gens)
    real = images.to(device)
    inverted = sampling.ddim_invert(ema, real, y)
    recon = sampling.sample(ema, inverted, y, strength=0.0, sampler="ddim")
    rows = [(f"s = {v}", samples[i * n : (i + 1) * n]) for i, v in enumerate(strengths)]
    rows[0] = (f"s = 0.0   (EMA weights at step {step})", rows[0][1])
    rows.append((f"real: {', '.join(dict.fromkeys(classes[c] for c in class_ids))}", real))
    rows += [("DDIM-inverted noise", inverted.clamp(-3, 3) / 3), ("DDIM reconstruction", recon)]
    # small images enlarged (nearest) to >= 96 px, so they can be judged
    sheet = viz.titled_rows(rows, "minus_one_one", min_size=96)
    atomic_save_image(viz.to_pil(sheet), path)
    return path


def sheet_images(dataset, columns):
    """Fixed real images for the sample sheets, spread over the categories: (images, ids)."""
    ids = [int(i) for i in np.linspace(0, len(dataset) - 1, min(columns, len(dataset))).round()]
    return torch.stack([dataset[i][0] for i in ids]), [dataset.class_ids[i] for i in ids]


def resume_settings(args):
    """The flags a resumed run must repeat, by name (e.g. {"--lr": 0.001}): the data and the
    network, then its training (the rest, e.g. --steps, may change)."""
    keys = ["data", "format", "categories", "preset", "image_size", "model_channels"]
    keys += ["init_weights", "batch_size", "accumulate", "lr", "ema", "ema_warmup", "seed"]
    return {cli.flag(k): getattr(args, k) for k in keys}


def build_model(args, classes, ddp, log):
    """The UNet (seeded; from --init-weights or a resumed state), its EMA copy, the optimiser
    and the model the loop calls (DDP-wrapped under torchrun):
    (arch, model, net, ema, optimizer, start_step)."""
    state = runs.load_state(args.out, args.resume, "diffusion_train_state", log)
    cli.seed_everything(args.seed)
    arch = adm.architecture(
        args.preset, len(classes), image_size=args.image_size, model_channels=args.model_channels
    )
    model = adm.build_unet(arch)
    if state is None and args.init_weights:
        adm.load_pretrained(model, args.init_weights, log=log)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if state is not None:
        path = os.path.join(args.out, runs.STATE_FILE)
        runs.require_same_settings(
            state["config"],
            resume_settings(args),
            f"--resume: {path!r} was made with another configuration",
            "give the same arguments or another --out",
        )
    # on the device first, then the optimiser: its restored moments follow the parameters
    model.to(ddp.device)
    ema.to(ddp.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    if state is not None:
        runs.restore_training(model, optimizer, state)
        ema.load_state_dict(state["ema"])
        runs.restore_rng(state["rng"])
        log(f"resumed {path} at step {state['step']}")
    net = model
    if ddp.enabled:
        device_ids = [ddp.device] if ddp.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids)
    log(
        f"UNet preset {args.preset}: {adm.count_parameters(model) / 1e6:.2f}M parameters, "
        f"{ddp.world_size} rank(s) on {ddp.device}"
    )
    return arch, model, net, ema, optimizer, state["step"] if state else 0


def log_end(args, start_step, log):
    """The last line: where the model is, or why there was nothing to train."""
    if start_step < args.steps:
        log(f"done: {os.path.join(args.out, 'model.pt')} (EMA weights; synthesize.py reads it)")
    else:
        state = os.path.join(args.out, runs.STATE_FILE)
        log(f"nothing to do: {state} is already at step {start_step} >= --steps {args.steps}")


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    ddp = distributed.setup(args.device)
    distributed.require_divisible_batch(args.batch_size, ddp)
    log = print if ddp.is_main else (lambda *a, **k: None)
    prepare_output_folder(
        args.out, clean=ddp.is_main, log=log, files=OUTPUT_FILES, subfolders=("samples",)
    )
    index, classes, dataset = training_images(args, log)
    arch, model, net, ema, optimizer, start_step = build_model(args, classes, ddp, log)
    schedule = default_schedule()
    diffusion = GaussianDiffusion.from_schedule(schedule)  # training: all T
    sampling = GaussianDiffusion.from_schedule(schedule, args.sample_steps)  # sheets: respaced
    sheet = sheet_images(dataset, args.sheet_columns)
    # what model.pt and state.pt hold besides the weights (synthesize.py rebuilds the UNet from it)
    common = {"arch": arch, "schedule": schedule, "classes": classes, "dataset": index.describe()}
    common.update(image_size=args.image_size, args=cli.args_to_dict(args))
    log_path = runs.start_outputs(args.out, args, start_step) if ddp.is_main else os.devnull
    batches = training_batches(dataset, args, start_step, ddp, log)
    progress = Progress(
        args.steps, "diffusion", every=args.log_every, start_step=start_step, enabled=ddp.is_main
    )
    sums, count = [0.0, 0.0, 0.0], 0  # loss, mse, vb since the last log line

    model.train()
    with open(log_path, "a") as loss_log:
        for step in range(start_step, args.steps):
            # one optimiser step over `accumulate` micro-batches: L_simple + L_vlb (docs/method.md)
            optimizer.zero_grad(set_to_none=True)
            sums = accumulate_gradients(net, diffusion, batches, step, args, ddp, sums)
            count += args.accumulate
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            if not torch.isfinite(grad_norm):
                raise cli.UserError(
                    f"step {step + 1}: the gradient is not finite; lower --lr (now {args.lr})"
                )
            optimizer.step()
            update_ema(ema, model, ema_decay(args.ema, args.ema_warmup, step))
            done, last = step + 1, step + 1 == args.steps

            metrics = {}
            if done % args.log_every == 0 or last:
                means = torch.tensor(sums, device=ddp.device) / max(count, 1)
                means = distributed.all_reduce_mean(means, ddp).tolist()
                metrics = dict(zip(("loss", "mse", "vb"), means))
                runs.log_line(loss_log, {"step": done, **metrics})
                sums, count = [0.0, 0.0, 0.0], 0
            progress.update(done, items=args.batch_size * args.accumulate, **metrics)
            if ddp.is_main and ((args.sample_every and done % args.sample_every == 0) or last):
                path = os.path.join(args.out, "samples", f"step_{done:07d}.png")
                sample_sheet(ema, sampling, *sheet, classes, done, ddp.device, path)
                log(f"sample sheet: {path}")
            if ddp.is_main and (done % args.save_every == 0 or last):
                settings = resume_settings(args)
                adm.save_checkpoints(args.out, done, model, ema, optimizer, settings, common)
            distributed.barrier(ddp)
    log_end(args, start_step, log)
    distributed.cleanup(ddp)


if __name__ == "__main__":
    cli.run(main)
