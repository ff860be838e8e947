"""Stage 1 of RealNet: train the class-conditional diffusion model that SDAS samples from.

Paper §3.1 and appendix B: a DDPM (T = 1000, linear betas) with IDDPM's learned variance,
trained on the NORMAL training images with L_simple + L_vlb, Adam 1e-4, EMA 0.9999,
initialised from OpenAI's ImageNet model. As in the authors' code, one model serves all
categories of a data set: the UNet is conditioned on the category id (facts §8.5, §9).

Run (paper scale, all MVTec categories, from OpenAI's weights; 4 GPUs):
    torchrun --nproc_per_node 4 train_diffusion.py --data data/mvtec --preset paper \
        --init-weights pretrain/256x256_diffusion.pt --batch-size 20 --accumulate 3 --steps 50000
Run (the tiny preset on a 2-core CPU, one category of the embedded demo data set, ~9 minutes;
s = 0 samples are grey washers on a dark table, s = 0.2 ones grainy and misshapen):
    python3 train_diffusion.py --data data/demo --categories washer --preset tiny --image-size 64 \
        --steps 600 --batch-size 8 --lr 1e-3 --out runs/diffusion_washer
Run (demo scale, ~3 minutes: 32 px washers):
    python3 train_diffusion.py --data data/demo --categories washer --preset tiny --image-size 32 \
        --steps 800 --batch-size 8 --lr 1e-3 --sample-every 0 --out runs/diffusion_washer32
A from-scratch tiny model needs a 10x larger learning rate than the paper's fine-tuning (1e-3,
not 1e-4) to make objects within minutes. On a machine shared with other jobs, run with
OMP_NUM_THREADS=1 (or OMP_WAIT_POLICY=PASSIVE): spinning OpenMP threads made it 2-5x slower here.

Writes to --out:
    model.pt            EMA weights + architecture + schedule + class list (what synthesize.py reads)
    train_state.pt      everything to continue (--resume): weights, EMA, optimiser, step, RNG, args
    samples/step_N.png  rows: s = 0, 0.1, 0.2 from the same noise, real images, DDIM round trip
    train_log.json      loss per logged step;   args.json   the arguments
"""
import argparse
import contextlib
import copy
import json
import os

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from realnet import adm, cli, distributed, viz
from realnet.data import load_image, open_dataset
from realnet.diffusion import GaussianDiffusion, default_schedule
from realnet.files import atomic_save_image, atomic_torch_save, atomic_write_json, load_checkpoint
from realnet.progress import Progress

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data", required=True, help="data set root (MVTec/MPDD/BTAD/VisA/folder layout)")
parser.add_argument("--format", default="auto", help="data set layout; auto-detected by default")
parser.add_argument("--categories", default=None,
                    help="comma-separated categories to train on (default: all, one class-conditional model as the authors)")
parser.add_argument("--out", default="runs/diffusion", help="output folder")
parser.add_argument("--preset", default="paper", choices=sorted(adm.PRESETS), help="UNet size (realnet/adm.py)")
parser.add_argument("--image-size", type=int, default=None, help="training resolution (default: the preset's, 256 paper / 64 tiny)")
parser.add_argument("--model-channels", type=int, default=None, help="override the preset's base width")
parser.add_argument("--init-weights", default=None,
                    help="initialise from OpenAI's 256x256_diffusion.pt (the paper does; only the label embedding stays random)")
parser.add_argument("--steps", type=int, default=50000, help="optimiser steps (the authors' MVTec run: about 50k, their issue #47)")
parser.add_argument("--batch-size", type=int, default=16,
                    help="images per forward/backward pass, over all ranks (authors: 5 per GPU x 4 GPUs = 20)")
parser.add_argument("--accumulate", type=int, default=1,
                    help="passes per optimiser step, gradients averaged (authors: 3, so 60 images per step)")
parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (paper: 1e-4, fine-tuning)")
parser.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clipping (paper: 1.0)")
parser.add_argument("--ema", type=float, default=0.9999, help="EMA decay of the weights synthesize.py uses (paper: 0.9999)")
parser.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="use min(ema, (1+n)/(10+n)) at update n, so a short run's EMA is not mostly its random "
                         "init (0.9999 needs ~10k updates to forget it); --no-ema-warmup is the authors' plain EMA")
parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: autocast the UNet (halves activation memory on a GPU; the authors used fp32)")
parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batches, timesteps and noise")
parser.add_argument("--log-every", type=int, default=20, help="steps between progress lines")
parser.add_argument("--sample-every", type=int, default=500, help="steps between sample sheets (0: only at the end)")
parser.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (and at the end)")
parser.add_argument("--sheet-columns", type=int, default=8, help="images per row of a sample sheet")
parser.add_argument("--sample-steps", type=int, default=20, help="respaced sampling steps for the sheets (as synthesize.py)")
parser.add_argument("--workers", type=int, default=None,
                    help="data loader processes (default: 4 with CUDA; 0 on a CPU, where they would compete with training)")
parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
parser.add_argument("--resume", action="store_true", help="continue from --out/train_state.pt")

# What must match for --resume to continue a run (the rest, e.g. --steps, may change).
RESUME_KEYS = ("data", "format", "categories", "preset", "image_size", "model_channels", "init_weights",
               "batch_size", "accumulate", "lr", "ema", "ema_warmup", "seed")


# ----------------------------------------------------------------------------- data
class TrainImages(torch.utils.data.Dataset):
    """Normal training images of all chosen categories in [-1, 1], with their class id.

    Decoded images are kept in memory when the whole set is small (under 512 MB)."""

    def __init__(self, samples, class_ids, size):
        self.samples, self.class_ids, self.size = samples, class_ids, size
        self.cache = {} if len(samples) * size * size * 3 < 512 * 2**20 else None

    def __len__(self):
        return len(self.samples)

    def image(self, i):
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        image = load_image(self.samples[i].image, self.size)
        if self.cache is not None:
            self.cache[i] = image
        return image

    def __getitem__(self, i):
        x = torch.from_numpy(self.image(i)).permute(2, 0, 1).float() / 127.5 - 1.0
        return x, self.class_ids[i]


class StepBatches(torch.utils.data.Sampler):
    """This rank's sample indices for each micro-batch from `start_step` on.

    Sample g of the whole run (g = micro_batch_number * global_batch + position) is image
    perm_epoch[g % n] with epoch = g // n and a permutation seeded by (seed, epoch): the
    order depends only on the seed, never on where a run was resumed or how many ranks
    share it. Rank r takes positions r, r + W, ... of each global micro-batch."""

    def __init__(self, n, global_batch, start_micro, total_micro, seed, rank=0, world=1):
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.start, self.total, self.rank, self.world = start_micro, total_micro, rank, world

    def __len__(self):
        return self.total - self.start

    def __iter__(self):
        perms = {}
        for m in range(self.start, self.total):
            batch = []
            for position in range(self.rank, self.global_batch, self.world):
                g = m * self.global_batch + position
                epoch = g // self.n
                if epoch not in perms:
                    perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
                batch.append(int(perms[epoch][g % self.n]))
            yield batch


# ----------------------------------------------------------------------------- training pieces
@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for parameters and buffers alike."""
    for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        else:
            e.copy_(p)


def ema_decay(args, updates):
    return min(args.ema, (1 + updates) / (10 + updates)) if args.ema_warmup else args.ema


def sample_noise(seed, micro, positions, image_shape, num_timesteps):
    """Timestep and noise of each sample, seeded by (seed, micro-batch, position in the global
    batch): a resumed run, or a run on another number of ranks, draws exactly the same."""
    ts, noises = [], []
    for p in positions:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, micro, p]).generate_state(1)[0]))
        ts.append(torch.randint(0, num_timesteps, (1,), generator=g))
        noises.append(torch.randn(image_shape, generator=g))
    return torch.cat(ts), torch.stack(noises)


@torch.no_grad()
def sample_sheet(ema, diffusion_sampling, images, class_ids, classes, args, step, device):
    """A PNG that shows at a glance whether the model makes objects or noise:
    rows s = 0, 0.1, 0.2 from the same x_T and the same per-step noise, then real images,
    then their DDIM-inverted noise and the DDIM reconstruction from it (the authors' check:
    training is done when the reconstruction equals the input)."""
    n = len(class_ids)
    y = torch.tensor(class_ids, device=device)
    size = args.image_size
    x_T = torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(1000 + j)) for j in range(n)])
    strengths = (0.0, 0.1, 0.2)
    gens = [torch.Generator().manual_seed(2000 + j) for _ in strengths for j in range(n)]
    s = torch.tensor([v for v in strengths for _ in range(n)])
    samples = diffusion_sampling.sample(ema, x_T.repeat(len(strengths), 1, 1, 1).to(device), y.repeat(len(strengths)),
                                        strength=s, generators=gens)
    real = images.to(device)
    inverted = diffusion_sampling.ddim_invert(ema, real, y)
    recon = diffusion_sampling.sample(ema, inverted, y, strength=0.0, sampler="ddim")
    rows = [(f"s = {v}", samples[i * n:(i + 1) * n]) for i, v in enumerate(strengths)]
    rows += [("real", real), ("DDIM-inverted noise", inverted.clamp(-3, 3) / 3), ("DDIM reconstruction", recon)]
    rows[0] = (f"s = 0.0   (EMA weights at step {step})", rows[0][1])
    rows[3] = (f"real: {', '.join(dict.fromkeys(classes[c] for c in class_ids))}", rows[3][1])
    zoom = -(-96 // size)  # small images enlarged (nearest) to >= 96 px, so they can be judged
    pictures = []
    for title, batch in rows:
        row = viz.hstack([viz.tensor_to_uint8(b, "minus_one_one").repeat(zoom, 0).repeat(zoom, 1) for b in batch])
        pictures.append(viz.labelled(row, title))
    sheet = np.concatenate([np.pad(p, ((0, 2), (0, 0), (0, 0)), constant_values=255) for p in pictures], axis=0)
    path = os.path.join(args.out, "samples", f"step_{step:07d}.png")
    atomic_save_image(viz.to_pil(sheet), path)
    return path


def training_config(args):
    return {k: getattr(args, k) for k in RESUME_KEYS}


def save_checkpoints(args, step, model, ema, optimizer, arch, schedule, classes, dataset, log):
    """model.pt for synthesize.py (EMA only) and train_state.pt for --resume; both atomic."""
    common = {"arch": arch, "schedule": schedule, "classes": classes, "image_size": args.image_size,
              "step": step, "dataset": dataset, "args": cli.args_to_dict(args)}
    atomic_torch_save({"kind": "diffusion", "version": 1, "ema": ema.state_dict(), **common},
                      os.path.join(args.out, "model.pt"))
    atomic_torch_save({"kind": "diffusion_train_state", "version": 1, "config": training_config(args),
                       "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                       "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
                       **common}, os.path.join(args.out, "train_state.pt"))
    atomic_write_json(os.path.join(args.out, "train_log.json"), log)


def load_train_state(args, path):
    state = load_checkpoint(path, "--resume", kind="diffusion_train_state")
    mine, theirs = training_config(args), state["config"]
    differs = [f"--{k.replace('_', '-')} {theirs.get(k)!r} there, {mine[k]!r} now" for k in RESUME_KEYS
               if theirs.get(k) != mine[k]]
    if differs:
        raise cli.UserError(f"--resume: {path!r} was made with another configuration ({'; '.join(differs)}); "
                            "give the same arguments or another --out")
    return state


# ----------------------------------------------------------------------------- main
def main():
    args = parser.parse_args()
    preset = adm.PRESETS[args.preset]
    args.image_size = args.image_size or preset["image_size"]
    for name in ("steps", "batch_size", "accumulate", "image_size", "sheet_columns", "sample_steps", "log_every",
                 "save_every"):
        if getattr(args, name) < 1:
            raise cli.UserError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if not 0.0 <= args.ema < 1.0:
        raise cli.UserError(f"--ema must be in [0, 1) (got {args.ema})")
    if args.image_size % 2 ** (len(preset["channel_mult"]) - 1):
        raise cli.UserError(f"--image-size {args.image_size}: must be a multiple of "
                            f"{2 ** (len(preset['channel_mult']) - 1)} for the {args.preset} preset")
    if args.init_weights and not os.path.isfile(args.init_weights):
        raise cli.UserError(f"--init-weights: file {args.init_weights!r} does not exist; download OpenAI's "
                            f"class-conditional 256x256 model from {adm.OPENAI_URL} (e.g. into pretrain/)")
    dist = distributed.setup(args.device)
    if args.batch_size % dist.world_size:
        raise cli.UserError(f"--batch-size {args.batch_size} must be a multiple of the number of ranks ({dist.world_size})")
    log = print if dist.is_main else (lambda *a, **k: None)
    if args.workers is None:
        args.workers = 4 if dist.device.type == "cuda" else 0

    # Data: the normal training images of the chosen categories; class id = position in `classes`.
    index = open_dataset(args.data, args.format, args.categories)
    classes = list(index.categories)
    samples, class_ids = [], []
    for c, name in enumerate(classes):
        train = index.train(name)
        samples += train
        class_ids += [c] * len(train)
    dataset = TrainImages(samples, class_ids, args.image_size)
    log(f"data: {len(samples)} normal training images of {len(classes)} categories ({', '.join(classes)}) "
        f"from {args.data} ({index.format}), {args.image_size}x{args.image_size}")

    state_path = os.path.join(args.out, "train_state.pt")
    state = None
    if args.resume and os.path.isfile(state_path):
        state = load_train_state(args, state_path)
    elif args.resume:
        log(f"--resume: no {state_path} yet, starting from step 0")
    elif os.path.exists(state_path):
        raise cli.UserError(f"{args.out!r} already holds a training run ({state_path}); pass --resume to continue it "
                            "or choose another --out")

    # Model, EMA copy, optimiser.
    cli.seed_everything(args.seed)
    arch = adm.architecture(args.preset, len(classes), image_size=args.image_size, model_channels=args.model_channels)
    model = adm.build_unet(arch)
    if state is None and args.init_weights:
        adm.load_pretrained(model, args.init_weights, log=log)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start_step, train_log = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        start_step = state["step"]
        if os.path.isfile(os.path.join(args.out, "train_log.json")):
            with open(os.path.join(args.out, "train_log.json")) as f:
                train_log = [r for r in json.load(f) if r["step"] <= start_step]
        log(f"resumed {state_path} at step {start_step}")
    model.to(dist.device)
    ema.to(dist.device)
    net = DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None) \
        if dist.enabled else model
    log(f"UNet preset {args.preset}: {adm.count_parameters(model) / 1e6:.2f}M parameters, {dist.world_size} rank(s) "
        f"on {dist.device}")

    schedule = default_schedule()
    diffusion = GaussianDiffusion.from_schedule(schedule)                        # training: all T steps
    diffusion_sampling = GaussianDiffusion.from_schedule(schedule, args.sample_steps)  # sheets: as synthesize.py

    # Fixed real images for the sheets: spread over the categories.
    columns = min(args.sheet_columns, len(dataset))
    sheet_ids = [int(i) for i in np.linspace(0, len(dataset) - 1, columns).round()]
    sheet_images = torch.stack([dataset[i][0] for i in sheet_ids])
    sheet_classes = [class_ids[i] for i in sheet_ids]

    if dist.is_main:
        os.makedirs(args.out, exist_ok=True)
        cli.save_args(args, args.out)
    positions = range(dist.rank, args.batch_size, dist.world_size)  # this rank's places in each batch
    loader = torch.utils.data.DataLoader(
        dataset, num_workers=args.workers, persistent_workers=args.workers > 0,
        batch_sampler=StepBatches(len(dataset), args.batch_size, start_step * args.accumulate,
                                  args.steps * args.accumulate, args.seed, dist.rank, dist.world_size))
    batches = iter(loader)
    progress = Progress(args.steps, "diffusion", every=args.log_every, start_step=start_step, enabled=dist.is_main)
    sum_loss = sum_mse = sum_vb = 0.0
    count = 0
    model.train()
    for step in range(start_step, args.steps):
        optimizer.zero_grad(set_to_none=True)
        for a in range(args.accumulate):
            micro = step * args.accumulate + a
            x0, y = next(batches)
            t, noise = sample_noise(args.seed, micro, positions, x0.shape[1:], diffusion.num_timesteps)
            x0, y, t, noise = (v.to(dist.device) for v in (x0, y, t, noise))
            # DDP: all-reduce the gradients only once, after the last micro-batch
            last_micro = a == args.accumulate - 1
            with net.no_sync() if dist.enabled and not last_micro else contextlib.nullcontext():
                with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                    losses = diffusion.training_losses(net, x0, t, y, noise)
                loss = losses["loss"].mean()
                (loss / args.accumulate).backward()
            sum_loss += loss.item()
            sum_mse += losses["mse"].mean().item()
            sum_vb += losses["vb"].mean().item()
            count += 1
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        if not torch.isfinite(grad_norm):
            raise cli.UserError(f"step {step + 1}: the gradient is not finite; lower --lr (now {args.lr})")
        optimizer.step()
        update_ema(ema, model, ema_decay(args, step))
        done = step + 1
        last = done == args.steps

        metrics = {}
        if done % args.log_every == 0 or last:
            means = torch.tensor([sum_loss, sum_mse, sum_vb], device=dist.device) / max(count, 1)
            means = distributed.all_reduce_mean(means, dist).tolist()
            metrics = {"loss": means[0], "mse": means[1], "vb": means[2]}
            train_log.append({"step": done, **metrics})
            sum_loss = sum_mse = sum_vb = 0.0
            count = 0
        progress.update(done, items=args.batch_size * args.accumulate, **metrics)
        if dist.is_main and ((args.sample_every and done % args.sample_every == 0) or last):
            path = sample_sheet(ema, diffusion_sampling, sheet_images, sheet_classes, classes, args, done, dist.device)
            log(f"sample sheet: {path}")
        if dist.is_main and (done % args.save_every == 0 or last):
            save_checkpoints(args, done, model, ema, optimizer, arch, schedule, classes, index.describe(), train_log)
        distributed.barrier(dist)
    if dist.is_main and start_step < args.steps:
        log(f"done: {os.path.join(args.out, 'model.pt')} (EMA weights; synthesize.py --checkpoint reads it)")
    elif dist.is_main:
        log(f"nothing to do: {state_path} is already at step {start_step} >= --steps {args.steps}")
    distributed.cleanup(dist)


if __name__ == "__main__":
    cli.run(main)
