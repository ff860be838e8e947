"""Images/s of the model's forward pass alone: evaluate.py's metrics.json, and with
--predict DIR --throughput the lot's throughput.json.

What is timed: images (B, 3, S, S) already in memory and on the device -> anomaly maps:
the backbone, AFS, the reconstruction UNets, RRS and the discriminator; no decoding, no
writing. 2 warm-up passes (allocator, kernel selection), then `repeats` timed ones, the
device synchronised around them.
"""

import time

import torch

from .inference import anomaly_maps as forward


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model, features, images, repeats):
    """Images/s of the forward pass alone, with what was measured."""
    device = images.device
    for _ in range(2):
        forward(model, features, images)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        forward(model, features, images)
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "images_per_s": round(len(images) * repeats / seconds, 3),
        "batch": len(images),
        "repeats": repeats,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "input_size": int(images.shape[-1]),
        "autocast": str(torch.get_autocast_dtype(device.type))
        if torch.is_autocast_enabled(device.type)
        else None,
        "measures": "backbone + AFS + reconstruction + RRS + discriminator, no data "
        "loading, synchronised",
    }
