"""The ADM UNet of OpenAI's guided-diffusion ("Diffusion Models Beat GANs"), class-conditional.

SDAS (RealNet §3.1) samples anomalies from a diffusion model that was fine-tuned from
OpenAI's class-conditional ImageNet model `256x256_diffusion.pt`. This file is that
network, written out here so that its state_dict has exactly OpenAI's key names and
shapes (`build_unet("paper", num_classes=1000)` equals `tests/data/adm256_cond_state_dict.json`)
and the file loads with `load_pretrained`.

Shape of the network (paper preset, 256x256 input):
    x (B,3,256,256) -> conv 3x3
      -> [ResBlock x2 (+attention at 32/16/8 px), ResBlock(down)] x 6 levels
    -> middle: ResBlock, attention, ResBlock -> mirrored up path with skip concatenations
    -> GroupNorm, SiLU, conv 3x3 -> (B, 6, 256, 256) = (epsilon, variance interpolation v)
The timestep (sinusoidal embedding -> MLP) plus the category's embedding is injected
into every ResBlock as a per-channel scale and shift of its second GroupNorm (FiLM,
"scale-shift norm").

Presets (see PRESETS): `paper` (552.8M parameters with 15 classes) and `tiny` (trains on a
laptop CPU in minutes at 64x64; same code, fewer channels and levels).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cli import UserError

PRESETS = {
    # OpenAI's 256x256 class-conditional model (guided-diffusion `256x256_diffusion.pt`), as
    # the authors use it (552.8M parameters with 15 classes).
    "paper": dict(
        image_size=256,
        in_channels=3,
        model_channels=256,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
        dropout=0.0,
        learn_sigma=True,
    ),
    # Same building blocks, small enough to train on 2 CPU cores: 4 levels at 64x64
    # (64 -> 32 -> 16 -> 8 px, widths 32, 32, 64, 64), one ResBlock per level, attention only
    # at 8x8 and in the middle; 1.5M parameters, 1.4 GFLOP per 64x64 image.
    "tiny": dict(
        image_size=64,
        in_channels=3,
        model_channels=32,
        channel_mult=(1, 1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        num_head_channels=32,
        use_scale_shift_norm=True,
        resblock_updown=True,
        dropout=0.0,
        learn_sigma=True,
    ),
}

# Where OpenAI's weights come from (named in the error when the file is missing).
OPENAI_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion.pt"


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of (B,) integer timesteps -> (B, dim): [cos(t f_i), sin(t f_i)]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as OpenAI's)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels):
    """GroupNorm with OpenAI's 32 groups, but never fewer than 4 channels per group.

    The paper preset (256+ channels) gets exactly OpenAI's 32 groups. A narrow net would
    otherwise get 1-2 channels per group: with one, GroupNorm is instance norm, which erases
    every channel's spatial mean, so the net cannot pass the mean of the input noise through
    to its noise estimate. At t ~ 950 the x_0 estimate divides that error by
    sqrt(abar) ~ 0.01 and every sample gets a random colour cast (we saw exactly this with
    the tiny preset at 32 groups; with 8 groups at 32 channels the colours are right).
    """
    return GroupNorm32(max(1, min(32, channels // 4)), channels)


def zero_module(module):
    """Zero the parameters: the residual branches and the output start as the identity / zero."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class Upsample(nn.Module):
    """Nearest x2, optionally followed by a 3x3 conv (used when resblock_updown is off)."""

    def __init__(self, channels, use_conv):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Strided 3x3 conv, or 2x2 average pooling when there is no conv."""

    def __init__(self, channels, use_conv):
        super().__init__()
        self.op = (
            nn.Conv2d(channels, channels, 3, stride=2, padding=1)
            if use_conv
            else nn.AvgPool2d(2, 2)
        )

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """GN-SiLU-conv, then FiLM by the embedding, GN-SiLU-dropout-conv(zero init), plus a skip.

    With up/down, the resampling happens inside the block (between the first norm and the
    first conv, on both branches) instead of in a separate layer: "resblock_updown".
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_scale_shift_norm=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(
                emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels
            ),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x, emb):
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels, with OpenAI's "legacy" qkv layout.

    The 1x1 conv `qkv` produces 3*C channels laid out per head as [q_h, k_h, v_h]
    (heads first), which is what the released weights expect.
    """

    def __init__(self, channels, num_head_channels):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(
                f"attention: {channels} channels are not a multiple of "
                f"{num_head_channels} per head"
            )
        self.num_heads = channels // num_head_channels
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x, emb=None):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # (B, 3C, L)
        length = qkv.shape[-1]
        ch = c // self.num_heads
        q, k, v = qkv.reshape(b * self.num_heads, 3 * ch, length).split(
            ch, dim=1
        )  # (B*H, ch, L) each
        # softmax(q^T k / sqrt(ch)) v, as scaled_dot_product_attention on (B*H, L, ch)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = a.transpose(1, 2).reshape(b, c, length)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class EmbedSequential(nn.Sequential):
    """A sequence of layers; ResBlocks also receive the timestep/class embedding."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


class UNet(nn.Module):
    """guided-diffusion's UNetModel (2-D, class-conditional when num_classes is given).

    forward(x (B,C,H,W) in [-1,1], timesteps (B,) integers 0..T-1, y (B,) class ids)
        -> (B, 2C, H, W) when learn_sigma: the predicted noise and the variance interpolation v.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        channel_mult,
        num_res_blocks,
        attention_resolutions,
        num_head_channels,
        use_scale_shift_norm,
        resblock_updown,
        dropout=0.0,
        learn_sigma=True,
        num_classes=None,
    ):
        super().__init__()
        self.image_size, self.in_channels, self.model_channels = (
            image_size,
            in_channels,
            model_channels,
        )
        self.num_classes = num_classes
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        # Attention is given at pixel resolutions; inside the net it is placed by the
        # downsampling factor ds = image_size / resolution (OpenAI's script does the same).
        attention_ds = {image_size // int(r) for r in attention_resolutions}
        emb_dim = model_channels * 4

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(ch_in, ch_out, **kw):
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, **kw)

        def attention(ch):
            return AttentionBlock(ch, num_head_channels)

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))]
        )
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attention(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, True)
                self.input_blocks.append(EmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(res(ch, ch), attention(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_ds:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1)),
        )

    def forward(self, x, timesteps, y=None):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            if y is None:
                raise ValueError("this UNet is class-conditional: pass y (the category ids)")
            emb = emb + self.label_emb(y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def architecture(preset, num_classes, **overrides):
    """The full constructor arguments of a preset (what a checkpoint stores to rebuild the net)."""
    if preset not in PRESETS:
        raise UserError(f"unknown UNet preset {preset!r}; known presets: {', '.join(PRESETS)}")
    kwargs = dict(PRESETS[preset])
    unknown = set(overrides) - set(kwargs)
    if unknown:
        raise ValueError(f"unknown UNet arguments {sorted(unknown)}")
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    kwargs["num_classes"] = num_classes
    kwargs["channel_mult"] = list(kwargs["channel_mult"])
    kwargs["attention_resolutions"] = list(kwargs["attention_resolutions"])
    return {"preset": preset, "kwargs": kwargs}


def build_unet(arch_or_preset, num_classes=None, **overrides):
    """build_unet("tiny", num_classes=3, image_size=64) or build_unet(checkpoint["arch"])."""
    arch = (
        arch_or_preset
        if isinstance(arch_or_preset, dict)
        else architecture(arch_or_preset, num_classes, **overrides)
    )
    return UNet(**arch["kwargs"])


def load_pretrained(model, path, log=print):
    """Copy every tensor of `path` whose name exists in `model` with the same shape.

    Accepts OpenAI's raw state_dict (`256x256_diffusion.pt`) and checkpoints that wrap one
    in 'state_dict' / 'ema' with a 'module.' prefix (e.g. the RealNet authors' released
    `mvtec_diffusion_ckpt_epoch_240.pt`). Unlike the authors' loader, what did not load is
    printed: with N != 1000 categories that is OpenAI's 1000-class `label_emb.weight`, which
    then keeps its random initialisation. Returns (loaded, skipped, missing) name lists.
    """
    import os

    if not os.path.isfile(path):
        raise UserError(
            f"--init-weights: file {path!r} does not exist; download OpenAI's "
            f"class-conditional 256x256 model from {OPENAI_URL} and give its path"
        )
    from .files import safe_torch_load  # weights_only=True: OpenAI's file is a plain state dict

    state = safe_torch_load(path, "--init-weights")
    if isinstance(state, dict) and state.get("kind") == "diffusion":
        state = state["ema"]
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"--init-weights: {path!r} does not hold a state_dict of tensors")
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    own = model.state_dict()
    loaded, skipped = [], []
    with torch.no_grad():
        for name, value in state.items():
            if name in own and own[name].shape == value.shape:
                own[name].copy_(value)
                loaded.append(name)
            else:
                shape = tuple(own[name].shape) if name in own else "absent"
                skipped.append(f"{name} {tuple(value.shape)} (model: {shape})")
    missing = sorted(set(own) - set(loaded))
    log(f"init weights {path}: loaded {len(loaded)}/{len(own)} tensors of the model")
    if skipped:
        log(f"  NOT loaded from the file ({len(skipped)}): " + "; ".join(skipped))
    if missing:
        log(f"  kept their random initialisation ({len(missing)}): " + ", ".join(missing))
    if not loaded:
        raise UserError(
            f"--init-weights: nothing in {path!r} fits this UNet "
            "(another architecture or image size?)"
        )
    return loaded, skipped, missing


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def save_checkpoints(out, step, model, ema, optimizer, settings, common):
    """What train_diffusion.py writes at `step`, both atomic: OUT/model.pt for synthesize.py
    (the EMA weights; `load_pretrained` reads them too) and OUT/state.pt for --resume. `common`
    (architecture, schedule, classes, ...) goes into both; `settings` are what --resume checks."""
    import os

    from . import runs
    from .files import atomic_torch_save

    atomic_torch_save(
        {"kind": "diffusion", "version": 1, "ema": ema.state_dict(), "step": step, **common},
        os.path.join(out, "model.pt"),
    )
    atomic_torch_save(
        {
            "kind": "diffusion_train_state",
            "version": 1,
            "config": settings,
            "step": step,
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": runs.rng_state(),
            **common,
        },
        os.path.join(out, runs.STATE_FILE),
    )
