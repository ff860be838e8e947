"""The frozen backbone: WideResNet50-2, layers 1-4 (docs/method.md, section 5).

Weights (`--backbone-weights`):
  imagenet  torchvision's Wide_ResNet50_2_Weights.IMAGENET1K_V1 (default). Read from the
            torch hub cache, <torch.hub.get_dir()>/checkpoints/wide_resnet50_2-95faca4d.pth;
            downloaded there when the machine is online; offline and missing: a one-line
            error that says where to put the file.
  <path>    a local .pth: torchvision's file, or timm's wide_resnet50_racm-8234f177.pth, the
            weights the authors used (timm's ResNet has torchvision's parameter names, so it
            loads into torchvision's model strictly).
  random    random initialisation, the same every time (seed 0). For smoke runs and tests
            only: the features of an untrained network are not what the paper is about.

Only the layers up to the deepest requested one are kept and computed.
"""

import os
import socket
import sys
import threading

import torch
import torch.nn as nn
import torchvision

from .cli import UserError
from .files import file_digest

ARCH = "wide_resnet50_2"
IMAGENET = torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1
WEIGHT_CHOICES = (
    "imagenet (torchvision, default), a path to a .pth file, or random (smoke runs only)"
)


class Backbone(nn.Module):
    """torchvision wide_resnet50_2 returning the requested layers (default layer1-4).

    Always in eval mode (BatchNorm uses its running statistics) and without gradients: the
    backbone is frozen in RealNet. Parameter names are torchvision's."""

    channels = (256, 512, 1024, 2048)  # of layer1..layer4
    strides = (4, 8, 16, 32)

    def __init__(self, net, layers=(1, 2, 3, 4), identity=None):
        super().__init__()
        layers = tuple(layers)
        if (
            not layers
            or any(l not in (1, 2, 3, 4) for l in layers)
            or list(layers) != sorted(set(layers))
        ):
            raise UserError(
                f"backbone layers must be ascending, distinct, from 1-4; got {list(layers)}"
            )
        self.layers = layers
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        for k in range(1, max(layers) + 1):  # deeper layers and fc are dropped: never computed
            setattr(self, f"layer{k}", getattr(net, f"layer{k}"))
        self.identity = identity or {"arch": ARCH, "weights": "unknown", "digest": None}
        self.requires_grad_(False)
        self.eval()
        # NHWC convolutions: about 1.4x faster on CPU (oneDNN); the outputs are returned NCHW
        self.to(memory_format=torch.channels_last)

    @property
    def out_channels(self):
        return [self.channels[l - 1] for l in self.layers]

    @property
    def out_strides(self):
        return [self.strides[l - 1] for l in self.layers]

    def train(self, mode=True):  # frozen: stays in eval mode whatever the caller asks
        return super().train(False)

    @torch.no_grad()
    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for k in range(1, max(self.layers) + 1):
            x = getattr(self, f"layer{k}")(x)
            if k in self.layers:
                features.append(x.contiguous())
        return features


def imagenet_cache_path():
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(IMAGENET.url))


def _reachable(url, timeout=5.0):
    """Can we open a connection to the URL's host? A daemon thread bounds the DNS lookup,
    which socket timeouts do not cover, so an offline machine answers in `timeout` s."""
    host = url.split("/")[2]
    result = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def _read_state_dict(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"--backbone-weights: {path!r} is not a readable torch file ({type(e).__name__})"
        )
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"--backbone-weights: {path!r} holds no state dict")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


def _load_strict(net, state, path):
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape mismatch
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"--backbone-weights: {path!r} does not fit {ARCH}: {detail}")
    if missing or unexpected:
        raise UserError(
            f"--backbone-weights: {path!r} does not fit {ARCH}: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]}) parameters"
        )


def load_backbone(weights="imagenet", layers=(1, 2, 3, 4)):
    """Build the frozen backbone. weights: "imagenet" | "random" | a path (see module doc)."""
    if weights == "random":
        print(
            "WARNING: --backbone-weights random: an UNTRAINED backbone (seed 0). Use it for "
            "smoke runs and tests only; results mean nothing for real data.",
            file=sys.stderr,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random network in every stage
            net = torchvision.models.wide_resnet50_2(weights=None)
        identity = {"arch": ARCH, "weights": "random", "digest": "seed0"}
        deep = [layer for layer in layers if layer >= 3]
        if deep:
            # Measured: adding a random network's layers 3-4 to 1-2 made RealNet's anomaly map
            # flat (pixel AUROC 0.37 after 1000 steps, from 0.999 with layers 1-2 alone).
            print(
                f"WARNING: layer{'s' if len(deep) > 1 else ''} {', '.join(map(str, deep))} "
                "of a RANDOM backbone carry no usable anomaly signal (deep random features are "
                "noise, and RealNet's map goes flat with them): use --layers 1 2 with "
                "--backbone-weights random",
                file=sys.stderr,
            )
    elif weights == "imagenet":
        path = imagenet_cache_path()
        if not os.path.isfile(path):
            if not _reachable(IMAGENET.url):
                raise UserError(
                    f"ImageNet weights {os.path.basename(path)} are not in the torch hub cache "
                    f"and this machine is offline: download {IMAGENET.url} into "
                    f"{os.path.dirname(path)}/, or pass --backbone-weights PATH.pth "
                    "(e.g. timm's wide_resnet50_racm-8234f177.pth) "
                    "or --backbone-weights random (smoke runs only)"
                )
            print(f"downloading {IMAGENET.url} to {path}", flush=True)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(
                IMAGENET.url, path, hash_prefix=os.path.basename(path).split("-")[1][:8]
            )
        net = torchvision.models.wide_resnet50_2(weights=None)
        _load_strict(net, _read_state_dict(path), path)
        identity = {
            "arch": ARCH,
            "weights": "imagenet",
            "source": "torchvision IMAGENET1K_V1",
            "file": os.path.basename(path),
            "digest": file_digest(path),
        }
    else:
        if not os.path.isfile(weights):
            raise UserError(
                f"--backbone-weights: {weights!r} is not a file; expected {WEIGHT_CHOICES}"
            )
        net = torchvision.models.wide_resnet50_2(weights=None)
        _load_strict(net, _read_state_dict(weights), weights)
        identity = {
            "arch": ARCH,
            "weights": os.path.abspath(weights),
            "file": os.path.basename(weights),
            "digest": file_digest(weights),
        }
    return Backbone(net, layers, identity)


# ----------------------------------------------------------------------------------------
# The frozen backbone a file was made with
# ----------------------------------------------------------------------------------------


def same_backbone(a, b):
    """Identities (backbone.Backbone.identity) of the same weights: architecture and digest."""
    key = lambda identity: (identity.get("arch"), identity.get("digest"))
    return bool(a) and bool(b) and key(a) == key(b)


def describe_backbone(identity):
    if not identity:
        return "an unknown backbone"
    weights, digest = identity.get("weights"), identity.get("digest")
    return f"{identity.get('arch')} weights {weights!r} (digest {digest})"


def load_recorded_backbone(recorded, weights, layers, what):
    """The frozen backbone a file (`what`, e.g. "--afs 'runs/x/afs.pt'") was made with:
    the weights it records, or --backbone-weights `weights` when given. Features of other
    weights would not mean the same: those are refused."""
    backbone = load_backbone(weights or (recorded or {}).get("weights", "imagenet"), layers)
    if not same_backbone(recorded, backbone.identity):
        raise UserError(
            f"{what} was made with backbone {describe_backbone(recorded)}, not "
            f"{describe_backbone(backbone.identity)}: give the same "
            "--backbone-weights"
        )
    return backbone
