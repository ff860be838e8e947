"""Can the backbone see a source's synthetic anomalies? Beyond the paper (issue 28).

At demo scale SDAS's diffusion model (300 steps, 64 px) draws colour noise. On an object or
a regular pattern a pasted patch of noise is still an anomaly. On a natural high-frequency
texture (sand, grass, stones) it is not: blended into texture that is itself noise-like,
the pasted region is no more unusual in the backbone's features than the normal texture
around it (measured on a procedural sand: less, pixel AUROC 0.42-0.46 below). Half the
training anomalies are then normal-looking regions labelled anomalous; the discriminator
learns nothing it can use and the held-out validation stays near chance
(benchmarks/results/issue28_diagnosis.md).

`source_visibility` measures this before any training, label-free, on the training images
only: for each anomaly source alone (SDAS, DTD), synthetic anomalies are made on a few
training images; every other training image fits a per-location Gaussian of each backbone
layer's features (mean and variance of every channel at every position); the anomalous
images' novelty map (squared z-score averaged over the channels, upsampled) is scored by
pixel AUROC against the anomaly masks. A source whose anomalies reach at most a given
AUROC on average over the layers cannot be seen by this backbone on this category:
select_features.py --min-source-visibility drops it (never the last one), and records why
in the AFS file.
"""

import numpy as np
import torch
import torch.nn.functional as F

from . import data, metrics
from .anomalies import AnomalySynthesizer
from .stream import AnomalyStream

SOURCES = ("sdas", "dtd")


@torch.no_grad()
def _features(backbone, images, device, batch=8):
    out = None
    for i in range(0, len(images), batch):
        feats = [f.double().cpu() for f in backbone(images[i : i + batch].to(device))]
        out = [[f] for f in feats] if out is None else [o + [f] for o, f in zip(out, feats)]
    return [torch.cat(o) for o in out]


def novelty_maps(backbone, normal_images, anomalous_images, device):
    """Per backbone layer, (N, S, S) float32: the per-location Gaussian novelty of the
    anomalous images (fitted on the normal images), squared z-score averaged over channels,
    upsampled to the input size."""
    size = anomalous_images.shape[-1]
    maps = []
    for normal, anomalous in zip(
        _features(backbone, normal_images, device), _features(backbone, anomalous_images, device)
    ):
        # floor: 1 % of the channel's variance over all positions (few images per position)
        var = normal.var(0) + 0.01 * normal.var((0, 2, 3))[:, None, None] + 1e-12
        z2 = ((anomalous - normal.mean(0)) ** 2 / var).mean(1, keepdim=True)
        novelty = F.interpolate(
            z2.float(), size=(size, size), mode="bilinear", align_corners=False
        )
        maps.append(novelty[:, 0].numpy())
    return maps


def novelty_auroc(backbone, normal_images, anomalous_images, masks, device):
    """Per backbone layer: pixel AUROC of `novelty_maps` against the masks (N, S, S)."""
    return [
        metrics.pixel_auroc(novelty, masks)
        for novelty in novelty_maps(backbone, normal_images, anomalous_images, device)
    ]


def source_visibility(
    backbone,
    samples,
    category,
    dataset_format,
    size,
    sdas_dir,
    dtd_dir,
    foreground,
    seed,
    device,
    n_anomalies=24,
    held=4,
    min_contrast=0.0,
):
    """{source: [pixel AUROC per backbone layer]} for each source given (sdas, dtd): how
    visible its synthetic anomalies are to the backbone against normal texture (0.5:
    not at all). The anomalies go on `held` of the training images, the Gaussian is fitted
    on the others; a pure function of the seed. `min_contrast`: as training will draw them
    (anomalies.paste_contrast)."""
    if len(samples) < 2:
        return {}
    held = max(1, min(held, len(samples) // 4))
    fit, targets = samples[:-held], samples[-held:]
    normal = torch.stack([data.to_tensor(data.load_image(s.image, size)) for s in fit])
    found = {}
    for name, folder in zip(SOURCES, (sdas_dir, dtd_dir)):
        if not folder:
            continue
        synthesizer = AnomalySynthesizer(
            category,
            dataset_format,
            size,
            folder if name == "sdas" else None,
            folder if name == "dtd" else None,
            foreground,
            min_contrast,
        )
        stream = AnomalyStream(targets, size, {category: synthesizer}, seed, normal_ratio=0.0)
        items = [stream[g] for g in range(n_anomalies)]
        images = torch.stack([it["image"] for it in items])
        masks = torch.stack([it["mask"][0] for it in items]).numpy()
        found[name] = novelty_auroc(backbone, normal, images, masks, device)
    return found


def is_invisible(scores, threshold):
    """A source's per-layer AUROCs say it is invisible: their mean is at most `threshold`.
    The mean, not the best layer: the model is fed every layer, and one layer a little
    above chance did not make a source learnable (granite, SDAS at 0.48 / 0.56: held-out
    validation 0.64 with the source kept, docs/method.md section 5)."""
    return None not in scores and float(np.mean(scores)) <= threshold


def invisible_sources(visibility, threshold):
    """The sources to drop: the invisible ones (`is_invisible`); never every source (with
    all of them below, none is dropped: the caller warns)."""
    low = [name for name, scores in visibility.items() if is_invisible(scores, threshold)]
    return [] if len(low) == len(visibility) else low


def describe(visibility):
    return ", ".join(
        f"{name} " + "/".join("n/a" if s is None else f"{s:.2f}" for s in scores)
        for name, scores in visibility.items()
    )


def report_invisible_sources(visibility, threshold, category):
    """`invisible_sources`, said on stdout for select_features.py --min-source-visibility:
    every source's AUROCs, then the sources dropped, or a warning when no source reaches
    `threshold` (all are kept then). Returns the sources to drop."""
    dropped = invisible_sources(visibility, threshold)
    print(
        f"anomaly sources, pixel AUROC of their anomalies' novelty per layer (chance 0.5): "
        f"{describe(visibility)}"
    )
    if dropped:
        kept = " and ".join(s for s in visibility if s not in dropped)
        print(
            f"note: --min-source-visibility {threshold}: the backbone cannot tell "
            f"{' and '.join(dropped)} anomalies from normal {category!r} images; AFS and "
            f"training use {kept} alone"
        )
    elif all(is_invisible(scores, threshold) for scores in visibility.values()):
        print(
            f"WARNING: no anomaly source reaches --min-source-visibility {threshold} on "
            f"{category!r}: all kept; the model may not learn its synthetic anomalies"
        )
    return dropped
