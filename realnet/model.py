"""The RealNet model (paper §3.3-3.4, eq. 5-6): what sits on top of the frozen backbone.

    features phi_k: the frozen WideResNet50's layers, AFS-selected (realnet/features.py:
                    the channels select_features.py chose; the model takes these only)
      -> one reconstruction UNet per level: G_k(phi_k) tries to give back normal features
      -> RRS: residuals (phi_k - G_k(phi_k))^2, upsampled, ranked; keep k_max + k_mean channels
      -> discriminator: a small conv net -> 2-class logits at image size; anomaly map = class 1

    loss = CE(logits, mask) + sum_k MSE(G_k(phi_k(A)), phi_k(I))     A anomalous, I clean

Beyond the paper, a model configured with anomaly_map "fused" reports another map: the
weighted mean of the discriminator's log-odds and of each level's reconstruction energy,
sum_c (phi_k - G_k(phi_k))^2, each scaled by its centre and spread on good images
(RealNet.fuse), which calibration fits after training (realnet/calibration.py). Training
is the same either way: the loss never sees the fused map.

The architecture follows the authors' code (docs/method.md, section 6): their
"ResBlock" has a single conv, down-sampling is average pooling, up-sampling two separate
transposed convs, attention sits on levels 1 and 2 and in the middle, and the output conv
is zero-initialised so that every reconstruction starts at exactly 0.

`config` (a plain dict, stored in every checkpoint) says everything needed to rebuild the
model; `build_config` makes it from an AFS file and the training arguments.
"""

import torch
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .cli import UserError


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

ARCHITECTURES = {
    "A": "one level per backbone layer (the paper's default)",
    "C": "neighbouring layers paired: the coarser one upsampled and concatenated to the finer",
}

ANOMALY_MAPS = {
    "discriminator": "the discriminator's class-1 probability, in [0, 1] (the paper)",
    "fused": "beyond the paper: the mean of the discriminator's log-odds and of each level's "
    "reconstruction energy, each scaled on good images by calibration",
}


def level_layers(arch, layers):
    """Which backbone layers feed each reconstruction level. A: [[1], [2], [3], [4]];
    C: [[1, 2], [3, 4]] (the authors' commented alternative: block1 = layer1 + up(layer2),
    block2 = layer3 + up(layer4))."""
    if arch == "A":
        return [[layer] for layer in layers]
    if arch == "C":
        if len(layers) % 2:
            raise UserError(
                f"--arch C pairs neighbouring layers; the AFS file has an odd number "
                f"of layers {layers}"
            )
        return [[layers[i], layers[i + 1]] for i in range(0, len(layers), 2)]
    raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")


def build_config(
    afs,
    arch="A",
    width_ratio=0.5,
    retention=1 / 3,
    k_max=None,
    k_mean=None,
    input_size=None,
    strides=(4, 8, 16, 32),
    anomaly_map="discriminator",
):
    """The model configuration from an AFS file (a dict as written by select_features.py).

    Channels after AFS: M = sum of the AFS dims. RRS keeps k_max = k_mean = M * retention / 2
    by default (the paper: M = 1536, 256 + 256 kept, retention 1/3). anomaly_map: one of
    ANOMALY_MAPS, what the model reports (RealNet.forward).
    """
    if anomaly_map not in ANOMALY_MAPS:
        raise ValueError(
            f"unknown anomaly map {anomaly_map!r}; expected one of {sorted(ANOMALY_MAPS)}"
        )
    layers = [int(layer) for layer in afs["layers"]]
    dims = [int(d) for d in afs["dims"]]
    total = sum(dims)
    half = max(1, int(round(total * retention / 2)))
    config = {
        "arch": arch,
        "layers": layers,
        "layer_strides": [int(strides[layer - 1]) for layer in layers],
        "backbone_channels": [int(len(s)) for s in afs["scores"]],
        "afs_dims": dims,
        "afs_indices": [[int(i) for i in idx] for idx in afs["indices"]],
        "levels": level_layers(arch, layers),
        "width_ratio": float(width_ratio),
        "channel_mult": [1, 2, 4],
        "num_res_blocks": 2,
        "attention_levels": [1, 2],
        "head_channels": 64,
        "k_max": int(k_max if k_max is not None else half),
        "k_mean": int(k_mean if k_mean is not None else half),
        "rrs_momentum": 0.9,
        "rrs_eps": 1e-5,
        "residual_layers": 2,
        "input_size": int(input_size if input_size is not None else afs["input_size"]),
        "backbone": afs.get("backbone"),
        "anomaly_map": anomaly_map,
    }
    if (
        config["k_max"] + config["k_mean"] < 1
        or min(config["k_max"], config["k_mean"]) < 0
        or max(config["k_max"], config["k_mean"]) > total
    ):
        raise UserError(
            f"--k-max {config['k_max']} --k-mean {config['k_mean']}: each must be in "
            f"[0, {total}] (the channels AFS keeps), and at least one positive"
        )
    require_reconstructable(
        config["input_size"],
        config["layer_strides"],
        config["levels"],
        len(config["channel_mult"]) - 1,
        config["layers"],
    )
    return config


def require_reconstructable(input_size, strides, levels=None, downsamplings=2, layers=None):
    """Each reconstruction UNet halves its level's feature map `downsamplings` times, so the
    map (input_size / the level's finest stride) must be a multiple of 2**downsamplings.
    Checked where the input size is chosen (select_features.py), not after training began.
    strides: of each layer; levels: groups of layers (default one per layer, architecture A)."""
    layers = layers or list(range(1, len(strides) + 1))
    stride_of = dict(zip(layers, strides))
    for group in levels or [[layer] for layer in layers]:
        stride = min(stride_of[layer] for layer in group)
        multiple = stride * 2**downsamplings
        if input_size % multiple:
            raise UserError(
                f"--input-size {input_size}: layer{group[0]}'s feature map "
                f"({input_size}/{stride}) must halve {downsamplings} times in its "
                f"reconstruction UNet; expected a multiple of {multiple}"
            )


def level_channels(config):
    dims = dict(zip(config["layers"], config["afs_dims"]))
    return [sum(dims[layer] for layer in group) for group in config["levels"]]


# ----------------------------------------------------------------------------------------
# Building blocks of the reconstruction UNet (as the authors': docs/method.md, section 6)
# ----------------------------------------------------------------------------------------


def group_count(channels, most=32):
    """GroupNorm(32) as the authors use; for small (demo) widths the largest divisor <= 32."""
    return max(g for g in range(1, min(most, channels) + 1) if channels % g == 0)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (as guided-diffusion does, for mixed precision)."""

    def __init__(self, channels):
        super().__init__(group_count(channels), channels)

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def zero_module(module):
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """h = conv3x3(SiLU(GN(x))) [resampled before the conv]; out = skip(x) + h.
    The authors' reconstruction ResBlock has a single conv (no second norm/conv, no dropout)."""

    def __init__(self, channels, out_channels=None, down=False, up=False):
        super().__init__()
        out_channels = out_channels or channels
        self.norm = GroupNorm32(channels)
        self.down, self.up = down, up
        if down:  # average pooling on both paths
            self.h_resample = self.x_resample = nn.AvgPool2d(2)
        elif up:  # two separate transposed convs, one per path
            self.h_resample = nn.ConvTranspose2d(channels, channels, 4, 2, 1)
            self.x_resample = nn.ConvTranspose2d(channels, channels, 4, 2, 1)
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x):
        h = F.silu(self.norm(x))
        if self.down or self.up:
            h, x = self.h_resample(h), self.x_resample(x)
        return self.skip(x) + self.conv(h)


class AttentionBlock(nn.Module):
    """Self-attention over positions, 64 channels per head, residual; proj_out starts at 0
    so the block starts as the identity. q, k, v are laid out per head as in
    guided-diffusion's QKVAttentionLegacy; softmax(q k^T / sqrt(c)) v is exactly what it
    computes (it scales q and k by c^-1/4 each)."""

    def __init__(self, channels, head_channels=64):
        super().__init__()
        heads = max(1, channels // head_channels)
        while channels % heads:
            heads -= 1
        self.heads = heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        q, k, v = qkv.reshape(b * self.heads, 3 * c // self.heads, h * w).chunk(3, dim=1)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        a = a.transpose(1, 2).reshape(b, c, h * w)
        return x + self.proj_out(a).reshape(b, c, h, w)


class ReconstructionUNet(nn.Module):
    """G_k: features (B, C, h, w) -> reconstructed features of the same shape.

    Width = ratio x C at level 0, x channel_mult per level (1, 2, 4); num_res_blocks
    ResBlocks per level; attention on levels 1 and 2 and in the middle; the decoder takes
    one skip connection per encoder block (num_res_blocks + 1 per level)."""

    def __init__(
        self,
        channels,
        width_ratio=0.5,
        channel_mult=(1, 2, 4),
        num_res_blocks=2,
        attention_levels=(1, 2),
        head_channels=64,
    ):
        super().__init__()
        base = max(1, int(width_ratio * channels))
        self.downsamplings = len(channel_mult) - 1
        self.encoder = nn.ModuleList([nn.Conv2d(channels, base, 3, padding=1)])
        skip_channels, ch = [base], base
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, base * mult)]
                ch = base * mult
                if level in attention_levels:
                    blocks.append(AttentionBlock(ch, head_channels))
                self.encoder.append(nn.Sequential(*blocks))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.encoder.append(ResBlock(ch, down=True))
                skip_channels.append(ch)
        self.middle = nn.Sequential(ResBlock(ch), AttentionBlock(ch, head_channels), ResBlock(ch))
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                blocks = [ResBlock(ch + skip_channels.pop(), base * mult)]
                ch = base * mult
                if level in attention_levels:
                    blocks.append(AttentionBlock(ch, head_channels))
                if level and i == num_res_blocks:
                    blocks.append(ResBlock(ch, up=True))
                self.decoder.append(nn.Sequential(*blocks))
        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, channels, 3, padding=1))
        )

    def forward(self, x):
        if x.shape[-1] % 2**self.downsamplings or x.shape[-2] % 2**self.downsamplings:
            raise ValueError(
                f"a reconstruction level of size {tuple(x.shape[-2:])} cannot be halved "
                f"{self.downsamplings} times; use a larger input size"
            )
        skips, h = [], x
        for block in self.encoder:
            h = block(h)
            skips.append(h)
        h = self.middle(h)
        for block in self.decoder:
            h = block(torch.cat([h, skips.pop()], dim=1))
        return self.out(h)


# ----------------------------------------------------------------------------------------
# RRS and the discriminator (paper §3.3, appendix B)
# ----------------------------------------------------------------------------------------


class ResidualSelection(nn.Module):
    """RRS: keep, per image, the k_max residual channels with the largest spatial max and
    the k_mean with the largest spatial mean of the BatchNorm-normalised residual (the
    normalisation only ranks; the kept values are the raw residuals). See realnet.ops."""

    def __init__(self, channels, k_max, k_mean, momentum=0.9, eps=1e-5):
        super().__init__()
        self.k_max, self.k_mean, self.momentum, self.eps = k_max, k_mean, momentum, eps
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, features, reconstructions, process_group=None):
        return ops.rrs_select(
            features,
            reconstructions,
            self.k_max,
            self.k_mean,
            self.running_mean,
            self.running_var,
            self.training,
            self.momentum,
            self.eps,
            process_group=process_group,
        )


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training under DDP (`process_group` set), normalises with the
    statistics of the global batch, so that W processes with B/W images each train the
    same model as one process with B (nn.SyncBatchNorm does the same but runs on CUDA only).
    The sums go through torch.distributed.nn's differentiable all_reduce: the gradient
    reaches every rank's inputs as it would in one process."""

    process_group = None

    def forward(self, x):
        if not self.training or self.process_group is None:
            return super().forward(x)
        shape = (1, -1, 1, 1)
        local_count = x.new_tensor([x.numel() // x.shape[1]], dtype=torch.float32)
        sums = dist_fn.all_reduce(
            torch.cat([x.sum(dim=(0, 2, 3)), local_count]), group=self.process_group
        )
        count = sums[-1]
        mean = sums[:-1] / count
        var = (
            dist_fn.all_reduce(
                ((x - mean.view(shape)) ** 2).sum(dim=(0, 2, 3)), group=self.process_group
            )
            / count
        )
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1), self.momentum)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


class Residual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
        )

    def forward(self, x):
        return x + self.block(x)


class Discriminator(nn.Module):
    """Selected residuals (B, k, H/4, W/4) -> 2-class logits at image size."""

    def __init__(self, channels, residual_layers=2):
        super().__init__()
        self.residuals = nn.Sequential(
            *[Residual(channels) for _ in range(residual_layers)], nn.ReLU()
        )
        self.decoder1 = nn.Sequential(
            nn.Conv2d(channels, 128, 3, padding=1), GlobalBatchNorm2d(128), nn.ReLU()
        )
        self.decoder2 = nn.Sequential(
            nn.Conv2d(128, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1), nn.ReLU()
        )
        self.decoder3 = nn.Sequential(
            nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)
        )

    def forward(self, selected, image_size):
        h = self.decoder2(self.decoder1(self.residuals(selected)))
        h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True)
        logits = self.decoder3(h)
        return F.interpolate(logits, size=image_size, mode="bilinear", align_corners=True)


# ----------------------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------------------


class RealNet(nn.Module):
    """Everything trained on top of the frozen backbone (which is kept outside: its
    weights are reloaded, never stored in RealNet checkpoints)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        channels = level_channels(config)
        self.reconstruction = nn.ModuleList(
            ReconstructionUNet(
                c,
                config["width_ratio"],
                tuple(config["channel_mult"]),
                config["num_res_blocks"],
                tuple(config["attention_levels"]),
                config["head_channels"],
            )
            for c in channels
        )
        self.rrs = ResidualSelection(
            sum(channels),
            config["k_max"],
            config["k_mean"],
            config["rrs_momentum"],
            config["rrs_eps"],
        )
        self.discriminator = Discriminator(
            config["k_max"] + config["k_mean"], config["residual_layers"]
        )
        self.process_group = None
        self.fused = config.get("anomaly_map", "discriminator") == "fused"
        if self.fused:  # per part of the map: its centre and scale on normal images, and
            # whether it counts (realnet/calibration.py fits them after training)
            self.register_buffer("map_centre", torch.zeros(1 + len(channels)))
            self.register_buffer("map_scale", torch.ones(1 + len(channels)))
            self.register_buffer("map_weight", torch.ones(1 + len(channels)))

    def set_process_group(self, group):
        """Under DDP: RRS ranks and the discriminator's BatchNorm normalises with the
        statistics of the global batch."""
        self.process_group = group
        for module in self.modules():
            if isinstance(module, GlobalBatchNorm2d):
                module.process_group = group

    def forward(self, features, image_size):
        """features: the AFS-selected features of the (possibly anomalous) images, one
        tensor per level. Returns reconstructions, selected residuals, logits, the
        discriminator's map and the anomaly map the model reports (config "anomaly_map"):
        the discriminator's map (the paper), or with "fused" also `map_parts` and their
        calibrated mean (see fuse)."""
        reconstructions = [g(f) for g, f in zip(self.reconstruction, features)]
        selected, indices = self.rrs(features, reconstructions, self.process_group)
        logits = self.discriminator(selected, image_size)
        discriminator_map = torch.softmax(logits.float(), dim=1)[:, 1]
        out = {
            "reconstructions": reconstructions,
            "selected": selected,
            "rrs_indices": indices,
            "logits": logits,
            "discriminator_map": discriminator_map,
            "anomaly_map": discriminator_map,
        }
        if self.fused and not self.training:  # training never uses the fused map
            out["map_parts"] = map_parts(logits, features, reconstructions)
            out["anomaly_map"] = self.fuse(out["map_parts"])
        return out

    def part_names(self):
        """What each part of the fused map is (map_parts' order)."""
        return ["discriminator log-odds"] + [
            f"level {i + 1} energy" for i in range(len(self.reconstruction))
        ]

    def fuse(self, parts):
        """The fused anomaly map (B, S, S): the weighted mean over the parts of
        (part - centre) / scale, with the centre, scale and weight that calibration measured
        on normal images (realnet/calibration.py). Each part then counts in units of its
        own spread on normal pixels, wherever its raw scale lies."""
        shape = (1, -1, 1, 1)
        z = (parts - self.map_centre.view(shape)) / self.map_scale.view(shape)
        return (z * self.map_weight.view(shape)).sum(dim=1) / self.map_weight.sum()


def map_parts(logits, features, reconstructions):
    """(B, 1 + levels, S, S): the discriminator's log-odds of "anomalous" (logit 1 - logit 0,
    unbounded: its probability saturates at 0 on normal pixels, where a tiny spread would make
    any firing outweigh every other part), then each level's reconstruction energy
    sum_c (phi_k - G_k(phi_k))^2 (eq. 5's error, per position), upsampled to the map's size.
    The energy sees every AFS channel of a level; the discriminator sees the RRS-kept ones
    through a network trained on synthetic anomalies only, and can miss a real defect that
    does not look like them (a bulge, a thin scratch) while the energy still shows it."""
    size = logits.shape[-2:]
    log_odds = (logits[:, 1] - logits[:, 0]).float()
    energies = [
        F.interpolate(
            ((f.float() - r.float()) ** 2).sum(1, keepdim=True),
            size=size,
            mode="bilinear",
            align_corners=False,
        )
        for f, r in zip(features, reconstructions)
    ]
    return torch.cat([log_odds[:, None]] + energies, dim=1)


def realnet_loss(output, clean_features, mask):
    """Paper eq. 6: CE(logits, mask) + sum over levels of MSE(G_k(phi_k(A)), phi_k(I)) (eq. 5).
    The segmentation loss reaches the reconstruction nets through the selected residuals."""
    segmentation = F.cross_entropy(output["logits"].float(), mask[:, 0].long())
    reconstruction = sum(
        F.mse_loss(r.float(), c.float()) for r, c in zip(output["reconstructions"], clean_features)
    )
    return segmentation + reconstruction, {
        "segmentation": segmentation.detach(),
        "reconstruction": reconstruction.detach(),
    }


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def describe(config):
    """One line: what this model is."""
    widths = [max(1, int(config["width_ratio"] * c)) for c in level_channels(config)]
    return (
        f"RealNet arch {config['arch']}: levels {config['levels']} "
        f"with {level_channels(config)} channels "
        f"(UNet widths {widths}), RRS keeps {config['k_max']}+{config['k_mean']} of "
        f"{sum(level_channels(config))}, input {config['input_size']}"
        + (", map fused" if config.get("anomaly_map") == "fused" else "")
    )
