"""The features RealNet reconstructs: image -> frozen backbone -> AFS, one tensor per level.

`FeatureExtractor` is that chain as one module, used by training, validation, evaluation
and the throughput measurement alike. Training also needs the features of each sample's
clean original (the reconstruction target): `pair_features` gives both, and
`FeatureCache` keeps the clean training images' features so they are computed once.
"""
import torch
import torch.nn as nn

from . import data


class FeatureExtractor(nn.Module):
    """images (B, 3, S, S), ImageNet-normalised -> AFS-selected features, one tensor per
    level. The backbone is frozen and the AFS indices are fixed: no gradients flow here.
    `model` is the RealNet whose configuration holds the AFS indices (model.select_features);
    it is not a sub-module of the extractor (its weights belong to the model alone)."""

    def __init__(self, backbone, model):
        super().__init__()
        self.backbone = backbone
        self.select = model.select_features

    @torch.no_grad()
    def forward(self, images):
        return self.select(self.backbone(images))


class FeatureCache:
    """AFS features of every clean training image, computed once in fixed chunks.

    Exact, not an approximation: the backbone is frozen (eval mode) and the training images
    are not augmented, so phi(I) is the same every epoch. Normal samples (half the batch)
    and every reconstruction target then cost nothing; only the synthetic anomalies go
    through the backbone. Computing it in fixed chunks at start-up keeps a resumed run
    bit-identical to an uninterrupted one."""

    def __init__(self, stream, features, device, chunk=16):
        self.levels = None
        n = len(stream.samples)
        for start in range(0, n, chunk):
            chunk_ids = range(start, min(n, start + chunk))
            images = torch.stack([data.to_tensor(stream.clean_image(i)) for i in chunk_ids])
            feats = features(images.to(device))
            if self.levels is None:
                self.levels = [torch.empty((n, *f.shape[1:]), dtype=f.dtype, device=device)
                               for f in feats]
            for cache, f in zip(self.levels, feats):
                cache[start:start + len(f)] = f

    def __call__(self, index):
        return [cache[index] for cache in self.levels]

    @staticmethod
    def bytes_needed(config, n_images):
        """float32 bytes of the cache for n_images with this model configuration."""
        size = config["input_size"]
        strides = dict(zip(config["layers"], config["layer_strides"]))
        dims = dict(zip(config["layers"], config["afs_dims"]))
        per_image = sum(sum(dims[layer] for layer in group) * (size // strides[group[0]]) ** 2
                        for group in config["levels"])
        return 4 * per_image * n_images


def make_cache(mode, config, stream, features, device, limit=4 * 2 ** 30):
    """--cache-features on | off | auto (on when the cache takes under `limit` bytes)."""
    small = FeatureCache.bytes_needed(config, len(stream.samples)) < limit
    use = mode == "on" or (mode == "auto" and small)
    return FeatureCache(stream, features, device) if use else None


@torch.no_grad()
def pair_features(batch, features, cache, device):
    """(input features of the possibly anomalous images, features of their clean originals),
    one tensor per level. A normal sample's clean image is its input: its features are
    computed once, and the backbone only sees the anomalous half twice (or, with the
    cache, only once)."""
    images = batch["image"].to(device, non_blocking=True)
    rows = batch["anomalous"].to(device).nonzero()[:, 0]
    if cache is not None:
        clean = cache(batch["index"].to(device))
        inputs = [c.clone() for c in clean]
        if len(rows):
            for f, a in zip(inputs, features(images[rows])):
                f[rows] = a
        return inputs, clean
    inputs = features(images)
    clean = [f.clone() for f in inputs]
    if len(rows):
        for c, f in zip(clean, features(batch["clean"].to(device)[rows])):
            c[rows] = f
    return inputs, clean
