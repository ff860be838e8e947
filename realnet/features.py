"""The features RealNet reconstructs: image -> frozen backbone -> AFS, one tensor per level.

`FeatureExtractor` is that chain as one module, used by training, validation, evaluation
and the throughput measurement alike. Training also needs the features of each sample's
clean original (the reconstruction target): `pair_features` gives both, and
`FeatureCache` keeps the clean training images' features so they are computed once.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data


class FeatureExtractor(nn.Module):
    """images (B, 3, S, S), ImageNet-normalised -> the frozen backbone -> AFS: the channels
    select_features.py chose (the model's config holds their indices), one tensor per level.
    This is the one place where AFS is applied; the model takes its output only. No
    gradients flow here: the backbone is frozen and the indices are fixed. The backbone is a
    sub-module (its weights are reloaded, never stored in RealNet checkpoints); the model is
    not (its weights belong to it alone)."""

    def __init__(self, backbone, model):
        super().__init__()
        config = getattr(model, "config", model)  # a RealNet, or its config
        self.backbone = backbone
        self.layers, self.levels = list(config["layers"]), [list(g) for g in config["levels"]]
        device = next(iter(backbone.parameters()), torch.empty(0)).device
        for layer, indices in zip(config["layers"], config["afs_indices"]):
            # part of the config, not of any state_dict
            self.register_buffer(
                f"afs_indices_{layer}",
                torch.tensor(indices, dtype=torch.long, device=device),
                persistent=False,
            )

    @torch.no_grad()
    def forward(self, images):
        return self.select(self.backbone(images))

    @torch.no_grad()
    def select(self, backbone_features):
        """AFS: backbone layers (a list in config order) -> one tensor per level. Layers of a
        level (architecture C) are upsampled to its finest layer and concatenated."""
        by_layer = {}
        for layer, f in zip(self.layers, backbone_features):
            by_layer[layer] = f.index_select(1, getattr(self, f"afs_indices_{layer}"))
        levels = []
        for group in self.levels:
            size = by_layer[group[0]].shape[-2:]
            parts = [
                by_layer[layer]
                if by_layer[layer].shape[-2:] == size
                else F.interpolate(by_layer[layer], size=size, mode="bilinear", align_corners=True)
                for layer in group
            ]
            levels.append(torch.cat(parts, dim=1))
        return levels


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
                self.levels = [
                    torch.empty((n, *f.shape[1:]), dtype=f.dtype, device=device) for f in feats
                ]
            for cache, f in zip(self.levels, feats):
                cache[start : start + len(f)] = f

    def __call__(self, index):
        return [cache[index] for cache in self.levels]

    @staticmethod
    def bytes_needed(config, n_images):
        """float32 bytes of the cache for n_images with this model configuration."""
        size = config["input_size"]
        strides = dict(zip(config["layers"], config["layer_strides"]))
        dims = dict(zip(config["layers"], config["afs_dims"]))
        per_image = sum(
            sum(dims[layer] for layer in group) * (size // strides[group[0]]) ** 2
            for group in config["levels"]
        )
        return 4 * per_image * n_images


def make_cache(mode, config, stream, features, device, limit=4 * 2**30):
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
