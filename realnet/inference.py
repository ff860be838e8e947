"""A trained RealNet, ready to score images: the checkpoint, its frozen backbone and AFS.

`load_model` is how evaluate.py, the calibration and the benchmarks open a checkpoint of
train_realnet.py; `anomaly_maps` is the forward pass they all score with; `dataset_maps`
scores a whole data set (evaluate.py's test splits).
"""

import torch

from .backbone import load_recorded_backbone
from .cli import UserError
from .features import FeatureExtractor
from .files import load_checkpoint
from .loaders import start_loader
from .model import RealNet
from .progress import Progress

# buffers of checkpoints made before calibration was its own step (realnet/calibration.py):
# the fused map's mean and std, measured during training; the weights are kept, the map
# must be recalibrated
LEGACY_BUFFERS = ("map_mean", "map_std")


def load_model(path, backbone_weights, device):
    """Rebuild the model from its checkpoint and reload the frozen backbone it was trained
    with (the checkpoint stores its identity, not its weights); refuse another backbone.
    Returns (model in eval mode, features: image -> AFS features, checkpoint)."""
    ckpt = load_checkpoint(path, "--checkpoint", kind="realnet")
    config = ckpt["config"]
    backbone = load_recorded_backbone(
        config.get("backbone"), backbone_weights, config["layers"], f"--checkpoint {path!r}"
    )
    broken = [
        name
        for name, value in ckpt["state_dict"].items()
        if value.is_floating_point() and not torch.isfinite(value).all()
    ]
    if broken:  # a diverged training: its maps would be NaN, and no metric defined
        raise UserError(
            f"--checkpoint {path!r}: {len(broken)} weight tensor(s) are not "
            f"finite (e.g. {broken[0]}): the training diverged; train again "
            "with a lower --lr"
        )
    state = dict(ckpt["state_dict"])
    legacy = [state.pop(name) for name in LEGACY_BUFFERS if name in state]
    ckpt.setdefault("calibration", None)  # older checkpoints: not calibrated
    model = RealNet(config)
    try:  # a legacy fused model lacks the calibration buffers: they keep their defaults
        model.load_state_dict(state, strict=not legacy)
    except RuntimeError as e:
        raise UserError(
            f"--checkpoint {path!r}: its weights do not fit its configuration "
            f"({str(e).splitlines()[0]})"
        )
    model = model.to(device).eval()
    return model, FeatureExtractor(backbone.to(device), model), ckpt


@torch.no_grad()
def anomaly_maps(model, features, images):
    """Images (B, 3, S, S), ImageNet-normalised -> anomaly maps (B, S, S): probabilities in
    [0, 1], or with the fused map (model.fused) calibrated scores (0: a normal pixel's
    median, 1: its 99th percentile)."""
    return model(features(images), images.shape[-2:])["anomaly_map"]


def dataset_maps(model, features, dataset, device, batch_size, workers, label):
    """Every image of `dataset` (data.TestSet) -> (maps (N, S, S), masks (N, S, S) or None),
    float32 numpy, with a progress line."""
    loader = start_loader(dataset, workers, batch_size=batch_size)
    progress = Progress(len(loader), label, unit="img", every=max(1, len(loader) // 10))
    maps, masks = [], []
    for step, batch in enumerate(loader, start=1):
        maps.append(anomaly_maps(model, features, batch["image"].to(device)).float().cpu())
        if "mask" in batch:
            masks.append(batch["mask"][:, 0])
        progress.update(step, items=len(batch["image"]))
    return torch.cat(maps).numpy(), (torch.cat(masks).numpy() if masks else None)
