"""Stage 2 of RealNet: SDAS, strength-controllable diffusion anomaly synthesis
(paper §3.1, algorithm 1).

Start from x_T ~ N(0, I) and run the trained model's reverse chain, 20 respaced steps
(timesteps 950, 900, ..., 0), but draw every step but the last from a wider Gaussian:
    x_{t-1} ~ N(mu_theta(x_t, t), (1 + s) Sigma_theta(x_t, t)),   s ~ U(0.1, 0.2) per image.
The extra variance s Sigma_theta pushes the chain off the normal images into their
low-density neighbourhood: images of the category with realistic-looking defects.
s = 0 gives normal images. RealNet later pastes Perlin-shaped pieces of these images into
normal training images (train_realnet.py).

Run (the default output folder is data/sdas/<category>):
    python3 synthesize.py --checkpoint runs/diffusion/model.pt --category bottle --count 10000
    torchrun --nproc_per_node 4 synthesize.py --checkpoint runs/diffusion/model.pt \\
        --category bottle --count 10000
Demo scale (a tiny model from train_diffusion.py; 64 images at 64 px take ~50 s on one CPU core):
    python3 synthesize.py --checkpoint runs/diffusion_washer/model.pt --category washer --count 64
Normal images for comparison:        --strength 0 0 --out data/sdas_normal/bottle
The DDIM variant (appendix, alg. S1): --sampler ddim --strength 0.01 0.03

Every image has its own seed, derived from --seed, the category and the image number i,
so the images do not depend on --batch-size or on the number of ranks, and a second run
skips the files already there (resumable). Writes <category>_<i:05d>.png, manifest.json
(strength and seed per image, settings, the checkpoint's digest) and preview/contact_sheet.png
(in a sub-folder, so that readers of "every image in the folder" never take it for a sample).
"""

import argparse
import glob
import json
import os
import time
import zlib

import numpy as np
import torch

from realnet import adm, cli, distributed, precision, runs, viz
from realnet.diffusion import GaussianDiffusion
from realnet.files import atomic_save_image, atomic_write_json, file_digest, load_checkpoint
from realnet.files import prepare_output_folder, readable_image
from realnet.progress import Progress


def parse_args(argv=None):
    # fmt: off
    # (a table of flags: one per line, continuation lines aligned under the help text)
    # the description: the docstring's first paragraph, on one line
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--checkpoint", default="runs/diffusion/model.pt",
        help="model.pt written by train_diffusion.py")
    add("--category", default=None,
        help="category to synthesise (default: the checkpoint's only one)")
    add("--count", type=int, default=256,
        help="images to make (authors' config: 256; their release: 10000)")
    add("--out", default=None, help="output folder (default: data/sdas/<category>)")
    add("--steps", type=int, default=20,
        help="respaced reverse steps (paper: 20, timesteps 0, 50, ..., 950)")
    add("--strength", type=float, nargs=2, default=[0.1, 0.2], metavar=("A", "B"),
        help="s ~ U(A, B) per image (paper: 0.1 0.2; 0 0 gives normal images)")
    add("--sampler", default="ancestral", choices=["ancestral", "ddim"],
        help="ancestral: IDDPM, algorithm 1 (the paper's); ddim: algorithm S1 (s in 0.01-0.03)")
    add("--eta", type=float, default=0.0, help="DDIM eta (only with --sampler ddim)")
    add("--batch-size", type=int, default=16, help="images per forward pass on each rank")
    add("--seed", type=int, default=0, help="base seed of every image's noise and strength")
    add("--sheet-count", type=int, default=32, help="images on contact_sheet.png (the first ones)")
    precision.add_precision_arg(p, "the diffusion UNet (the sampler's arithmetic stays fp32)")
    cli.add_device_arg(p)
    # fmt: on
    return p.parse_args(argv)


def check_args(args):
    """One-line errors for values that cannot work, before anything is loaded."""
    a, b = args.strength
    if a < 0 or b < 0:
        raise cli.UserError(
            f"--strength {a} {b}: the anomaly strength s must be >= 0 (s = 0 gives normal images)"
        )
    if a > b:
        raise cli.UserError(f"--strength {a} {b}: expected A <= B (s ~ U(A, B))")
    cli.require_positive(count=args.count, batch_size=args.batch_size, steps=args.steps)
    cli.require_non_negative(sheet_count=args.sheet_count)
    if args.eta < 0:
        raise cli.UserError(f"--eta must be >= 0 (got {args.eta})")
    if args.eta != 0 and args.sampler != "ddim":
        raise cli.UserError(
            f"--eta {args.eta} has no effect with --sampler {args.sampler} "
            "(it is DDIM's: add --sampler ddim)"
        )


def load_diffusion(args):
    """The diffusion checkpoint; sets args.category (when not given: the checkpoint's only one)."""
    ckpt = load_checkpoint(args.checkpoint, "--checkpoint", kind="diffusion")
    classes = ckpt["classes"]
    args.category = cli.only_category(args.category, classes, repr(args.checkpoint))
    if args.category not in classes:
        raise cli.UserError(
            f"--category {args.category!r}: {args.checkpoint!r} was trained on "
            f"{', '.join(classes)}"
        )
    return ckpt


def sampling_settings(args, ckpt):
    """What the images depend on (saved in every manifest; a folder is completed only with
    the same settings)."""
    return {
        "checkpoint_digest": file_digest(args.checkpoint),
        "category": args.category,
        "class_id": ckpt["classes"].index(args.category),
        "steps": args.steps,
        "sampler": args.sampler,
        "eta": args.eta,
        "strength": list(args.strength),
        "seed": args.seed,
        "image_size": ckpt["image_size"],
        "precision": args.precision,
    }


def check_previous(out_dir, settings):
    """Refuse to add to a folder made with other settings (mixed images would be mislabelled)."""
    for path in sorted(glob.glob(os.path.join(out_dir, "manifest*.json"))):
        try:
            with open(path) as f:
                previous = json.load(f).get("settings")
        except (OSError, ValueError):
            continue  # a stale, unreadable part: it is rewritten below
        if previous is not None:
            previous.setdefault("precision", "fp32")  # folders made before --precision existed
            runs.require_same_settings(
                previous,
                settings,
                f"{out_dir!r} holds images made with other settings",
                "choose another --out or delete the folder",
            )


def load_model(ckpt, steps, device):
    """The EMA UNet, in eval mode on `device`, and the diffusion respaced to `steps` steps."""
    model = adm.build_unet(ckpt["arch"])
    model.load_state_dict(ckpt["ema"])
    model.to(device).eval()
    return model, GaussianDiffusion.from_schedule(ckpt["schedule"], steps)


def image_plan(seed, category, i, strength_range):
    """Strength and RNG seeds of image i: a function of (seed, category, i) only."""
    ss = np.random.SeedSequence([seed, zlib.crc32(category.encode()), i])
    noise_seed, step_seed, strength_seed = (
        int(v) for v in ss.generate_state(3, dtype=np.uint64) % (2**63)
    )
    a, b = strength_range
    s = float(np.random.default_rng(strength_seed).uniform(a, b)) if b > a else float(a)
    return {"index": i, "strength": s, "noise_seed": noise_seed, "step_seed": step_seed}


def image_name(category, i):
    return f"{category}_{i:05d}.png"


def images_to_make(out_dir, args, ddp, log):
    """This rank's images: i = rank, rank + W, ...; the ones already on disk are skipped."""
    mine = list(range(ddp.rank, args.count, ddp.world_size))
    # done: a readable image; an empty or cut file (not written by this script, whose saves
    # are atomic) is made again
    image_path = lambda i: os.path.join(out_dir, image_name(args.category, i))
    present = [i for i in mine if os.path.isfile(image_path(i))]
    broken = [i for i in present if not readable_image(image_path(i))]
    if broken:
        print(
            f"rank {ddp.rank}: {len(broken)} unreadable image(s) in {out_dir} are made again "
            f"(e.g. {image_name(args.category, broken[0])})"
        )
    todo = sorted(set(mine) - set(present) | set(broken))
    log(
        f"{args.count} images to {out_dir}: {len(mine) - len(todo)} already there on rank "
        f"{ddp.rank}, {len(todo)} to make ({ddp.world_size} rank(s), batch {args.batch_size})"
    )
    return todo


def to_uint8(x):
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8: (x + 1) * 127.5, rounded and clipped (the
    authors truncate)."""
    x = (x.float().cpu().permute(1, 2, 0).numpy() + 1.0) * 127.5
    return x.round().clip(0, 255).astype(np.uint8)


@torch.no_grad()
def synthesize(model, sampling, plans, settings, device):
    """SDAS for a batch of planned images -> uint8 images (class, size, sampler and eta
    from the settings)."""
    size = settings["image_size"]
    noise = [torch.Generator().manual_seed(p["noise_seed"]) for p in plans]
    x_T = torch.stack([torch.randn(3, size, size, generator=g) for g in noise]).to(device)
    generators = [torch.Generator().manual_seed(p["step_seed"]) for p in plans]
    strength = torch.tensor([p["strength"] for p in plans])
    y = torch.full((len(plans),), settings["class_id"], dtype=torch.long, device=device)
    sampler, eta = settings["sampler"], settings["eta"]
    x0 = sampling.sample(
        model, x_T, y, strength=strength, sampler=sampler, eta=eta, generators=generators
    )
    return [to_uint8(x) for x in x0]


def merge_manifests(out_dir, args):
    """Every image's record from the ranks' partial manifests, recomputed for files made by
    an earlier run: a record is a function of the seed and the image number."""
    by_index = {}
    parts = sorted(glob.glob(os.path.join(out_dir, "manifest.rank*.json")))
    for path in parts:
        with open(path) as f:
            for r in json.load(f)["images"]:
                by_index[r["index"]] = r
    merged = []
    for i in range(args.count):
        path = os.path.join(out_dir, image_name(args.category, i))
        if not os.path.isfile(path):
            raise cli.UserError(f"{path!r} is missing after synthesis (a rank failed?)")
        if i not in by_index:  # made by an earlier run
            plan = image_plan(args.seed, args.category, i, args.strength)
            by_index[i] = {"file": image_name(args.category, i), **plan}
        merged.append(by_index[i])
    return merged


def sheet_path(out_dir):
    return os.path.join(out_dir, "preview", "contact_sheet.png")


def write_manifest(out_dir, args, settings, ckpt):
    """manifest.json, from the ranks' partial manifests (then removed), and the contact sheet
    of the first --sheet-count images, each captioned with its strength."""
    merged = merge_manifests(out_dir, args)
    s = np.array([r["strength"] for r in merged])
    stats = {"min": float(s.min()), "mean": float(s.mean()), "max": float(s.max())}
    atomic_write_json(
        os.path.join(out_dir, "manifest.json"),
        {
            "kind": "sdas",
            "settings": settings,
            "checkpoint": os.path.abspath(args.checkpoint),
            "checkpoint_step": ckpt["step"],
            "count": args.count,
            "strength_stats": stats,
            "args": cli.args_to_dict(args),
            "images": merged,
        },
    )
    for path in glob.glob(os.path.join(out_dir, "manifest.rank*.json")):
        os.unlink(path)
    shown = merged[: args.sheet_count]
    if shown:
        sheet = viz.contact_sheet(
            [os.path.join(out_dir, r["file"]) for r in shown],
            [f"{r['index']} s={r['strength']:.3f}" for r in shown],
        )
        atomic_save_image(viz.to_pil(sheet), sheet_path(out_dir))


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    ckpt = load_diffusion(args)
    out_dir = args.out or os.path.join("data", "sdas", args.category)
    ddp = distributed.setup(args.device)
    precision.check_precision(args.precision, ddp.device)
    log = print if ddp.is_main else (lambda *a, **k: None)

    settings = sampling_settings(args, ckpt)
    prepare_output_folder(
        out_dir, clean=ddp.is_main, log=log, files=("manifest.json",), subfolders=("preview",)
    )
    distributed.barrier(ddp)  # no rank saves before the main one has removed stale temporaries
    check_previous(out_dir, settings)

    model, sampling = load_model(ckpt, args.steps, ddp.device)
    a, b = args.strength
    log(
        f"checkpoint {args.checkpoint} (step {ckpt['step']}, {ckpt['arch']['preset']} preset, "
        f"{ckpt['image_size']}px, categories {', '.join(ckpt['classes'])}); "
        f"timesteps {sampling.timestep_map.tolist()[::-1][:3]}..., "
        f"{args.sampler} sampler, s ~ U({a}, {b})"
    )

    todo = images_to_make(out_dir, args, ddp, log)
    part_path = os.path.join(out_dir, f"manifest.rank{ddp.rank}.json")
    records = []
    progress = Progress(len(todo), "sdas", unit="img", every=1, enabled=ddp.is_main)
    start = time.time()
    for first in range(0, len(todo), args.batch_size):
        batch = todo[first : first + args.batch_size]
        plans = [image_plan(args.seed, args.category, i, args.strength) for i in batch]
        with precision.autocast(args.precision, ddp.device):
            images = synthesize(model, sampling, plans, settings, ddp.device)
        for plan, image in zip(plans, images):
            name = image_name(args.category, plan["index"])
            atomic_save_image(viz.to_pil(image), os.path.join(out_dir, name))
            records.append({"file": name, **plan})
        atomic_write_json(part_path, {"settings": settings, "images": records})
        progress.update(min(first + args.batch_size, len(todo)), items=len(plans))
    if todo:
        log(f"rank {ddp.rank}: {len(todo)} images in {time.time() - start:.1f} s")

    distributed.barrier(ddp)
    if ddp.is_main:
        write_manifest(out_dir, args, settings, ckpt)
        log(
            f"done: {args.count} images, {os.path.join(out_dir, 'manifest.json')}, "
            f"{sheet_path(out_dir)} (look at it: objects, or noise?)"
        )
    distributed.barrier(ddp)
    distributed.cleanup(ddp)


if __name__ == "__main__":
    cli.run(main)
