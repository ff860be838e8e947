"""The training stream: sample g of a run, normal or with a synthetic anomaly, as a pure
function of (seed, g).

g = step * global_batch + position. The image of sample g comes from a permutation of
the training images seeded per epoch (`EpochOrder`); whether it gets an anomaly depends
only on g (`is_normal_sample`); the anomaly's randomness is `default_rng([seed, g])`. So
the training data do not depend on the number of ranks or workers, nor on resuming.
"""

import math
import os

import numpy as np
import torch
from PIL import Image

from . import data, viz
from .cli import UserError
from .files import atomic_save_image


class EpochOrder:
    """Item g of an endless run over n items: epoch = g // n, and within an epoch a
    permutation seeded by (seed, epoch). The order depends on the seed alone, never on
    where a run was resumed or how many ranks share it. Keeps the current epoch's
    permutation (runs go through g in increasing order)."""

    def __init__(self, n, seed):
        self.n, self.seed = n, seed
        self._epoch, self._permutation = None, None

    def __call__(self, g):
        epoch, position = divmod(g, self.n)
        if self._epoch != epoch:
            self._epoch = epoch
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._permutation[position])


def is_normal_sample(g, normal_ratio):
    """Sample g is normal iff ceil((g+1) r) - ceil(g r) == 1: for r = 1/2 the even g's, so
    any run of B consecutive g's (one batch) holds exactly B r normal samples for even B."""
    return math.ceil((g + 1) * normal_ratio) - math.ceil(g * normal_ratio) == 1


class AnomalyStream(torch.utils.data.Dataset):
    """Training samples as an endless, deterministic stream indexed by a global sample id g.

    Image: `EpochOrder(n, seed)`. Sample kind: with normal_ratio=0.5 exactly half of every
    batch is normal (g even -> normal, g odd -> synthetic anomaly); normal_ratio=0 -> all
    anomalous (AFS). An anomalous sample is made by the synthesizer of its image's category
    (`synthesizers`: category -> anomalies.AnomalySynthesizer; one entry for the paper's one
    model per category, several for a unified model) with the generator
    np.random.default_rng([seed, g]).

    Items: image (anomalous, normalised), clean (the image before synthesis, normalised),
    mask (1,S,S), anomalous (bool), index (position of the image in `samples`), g.
    """

    def __init__(self, samples, size, synthesizers, seed=0, normal_ratio=0.5, cache_images=True):
        if not samples:
            raise UserError("no training images to synthesise anomalies on")
        if not 0.0 <= normal_ratio <= 1.0:
            raise UserError(f"normal_ratio must be in [0, 1], got {normal_ratio}")
        missing = sorted({s.category for s in samples} - set(synthesizers))
        if missing:
            raise UserError(f"no anomaly synthesizer for category {', '.join(missing)}")
        self.samples, self.size, self.synthesizers = list(samples), size, dict(synthesizers)
        self.seed, self.normal_ratio = seed, normal_ratio
        self.cache_images = cache_images
        self._images = {}
        self.image_index = EpochOrder(len(self.samples), seed)

    def __len__(self):  # endless; the sampler says which g's to take
        return 2**62

    def clean_image(self, index):
        """The resized uint8 training image (decoded once per worker when cache_images)."""
        if index in self._images:
            return self._images[index]
        image = data.load_image(self.samples[index].image, self.size)
        if self.cache_images:
            self._images[index] = image
        return image

    def raw(self, g):
        """Sample g in uint8, with what made it (kind, delta, source) for pictures."""
        index = self.image_index(g)
        clean = self.clean_image(index)
        if is_normal_sample(g, self.normal_ratio):
            return dict(
                clean=clean,
                anomalous=clean,
                mask=np.zeros(clean.shape[:2], np.float32),
                is_anomalous=False,
                index=index,
                kind="normal",
                delta=0.0,
                source=None,
                contrast=0.0,
            )
        synthesizer = self.synthesizers[self.samples[index].category]
        out = synthesizer.synthesize(clean, np.random.default_rng([self.seed, g]))
        return dict(clean=clean, is_anomalous=True, index=index, **out)

    def __getitem__(self, g):
        r = self.raw(int(g))
        return dict(
            image=data.to_tensor(r["anomalous"]),
            clean=data.to_tensor(r["clean"]),
            mask=torch.from_numpy(np.ascontiguousarray(r["mask"], np.float32))[None],
            anomalous=r["is_anomalous"],
            index=r["index"],
            g=int(g),
        )


class StreamSampler(torch.utils.data.Sampler):
    """Yields this rank's g's for steps [start_step, total_steps): rank r of W takes positions
    [r*B/W, (r+1)*B/W) of each global batch of B. Use with DataLoader(batch_size=B//W)."""

    def __init__(self, start_step, total_steps, global_batch, rank=0, world_size=1):
        if global_batch % world_size:
            raise UserError(
                f"global batch {global_batch} is not divisible by the {world_size} processes"
            )
        self.start_step, self.total_steps = start_step, total_steps
        self.global_batch = global_batch
        self.per_rank = global_batch // world_size
        self.offset = rank * self.per_rank

    def __len__(self):
        return max(0, self.total_steps - self.start_step) * self.per_rank

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            base = step * self.global_batch + self.offset
            yield from range(base, base + self.per_rank)


class StepBatches(torch.utils.data.Sampler):
    """Batches of image indices for a plain (non-synthetic) training set: this rank's indices
    of each global micro-batch from `start_micro` on (train_diffusion.py).

    Sample g of the whole run (g = micro_batch_number * global_batch + position) is image
    EpochOrder(n, seed)(g), as in AnomalyStream: the order depends only on the seed, never on
    where a run was resumed or how many ranks share it. Rank r takes positions r, r + W, ...
    of each global micro-batch."""

    def __init__(self, n, global_batch, start_micro, total_micro, seed, rank=0, world=1):
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.start, self.total, self.rank, self.world = start_micro, total_micro, rank, world

    def __len__(self):
        return self.total - self.start

    def __iter__(self):
        order = EpochOrder(self.n, self.seed)
        for m in range(self.start, self.total):
            yield [
                order(m * self.global_batch + position)
                for position in range(self.rank, self.global_batch, self.world)
            ]


def sample_noise(seed, micro, positions, image_shape, num_timesteps):
    """Timestep and noise of each sample of a diffusion model's micro-batch (train_diffusion.py),
    seeded by (seed, micro-batch, position in the global batch): a resumed run, or a run on
    another number of ranks, draws exactly the same."""
    ts, noises = [], []
    for p in positions:
        seq = np.random.SeedSequence([seed, micro, p])
        g = torch.Generator().manual_seed(int(seq.generate_state(1)[0]))
        ts.append(torch.randint(0, num_timesteps, (1,), generator=g))
        noises.append(torch.randn(image_shape, generator=g))
    return torch.cat(ts), torch.stack(noises)


# ----------------------------------------------------------------------------------------
# Looking at it
# ----------------------------------------------------------------------------------------


def dump_examples(stream, n, out_dir, start_g=0):
    """Write the first n synthetic anomalies of the stream (from start_g on) as PNGs:
    example_XX.png (what the model sees), example_XX_mask.png, and contact_sheet.png with
    one row per example: clean | anomalous | mask | anomalous with the mask's contour.
    Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written, rows, g = [], [], start_g
    while len(rows) < n:
        r = stream.raw(g)
        g += 1
        if not r["is_anomalous"]:
            continue
        i = len(rows)
        mask_rgb = viz.mask_to_uint8(r["mask"])
        for suffix, picture in (("", r["anomalous"]), ("_mask", mask_rgb[..., 0])):
            path = os.path.join(out_dir, f"example_{i:02d}{suffix}.png")
            atomic_save_image(Image.fromarray(picture), path)
            written.append(path)
        caption = f"g={g - 1} {r['kind']} d={r['delta']:.2f} c={r['contrast']:.2f}"
        contour = viz.draw_contour(r["anomalous"], r["mask"] > 0)
        rows.append(
            viz.hstack(
                [
                    viz.labelled(r["clean"], "clean"),
                    viz.labelled(r["anomalous"], caption),
                    viz.labelled(mask_rgb, "mask"),
                    viz.labelled(contour, "contour"),
                ]
            )
        )
    if rows:
        sheet = os.path.join(out_dir, "contact_sheet.png")
        atomic_save_image(viz.to_pil(viz.grid(rows, 1)), sheet)
        written.append(sheet)
    return written


def write_examples(stream, n, folder):
    """--dump N: the first N training pairs as pictures (what the model learns from)."""
    if n:
        written = dump_examples(stream, n, folder)
        print(f"wrote {n} example training pairs to {folder} ({written[-1]})")
