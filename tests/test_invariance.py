"""In eval mode an image's anomaly map is a function of that image alone: not of which
other images share its batch, nor of the batch size. (In training, RRS ranks with the
statistics of the batch and BatchNorm normalises with them: there the batch matters, on
purpose.)"""

import pytest
import torch

from realnet.backbone import load_backbone
from realnet.features import FeatureExtractor
from realnet.model import RealNet, build_config

SIZE = 64
# Same image, same weights, same kernels: only the batch around it changes. What can still
# differ is the order of floating-point sums where a kernel picks its blocking by the batch
# size (oneDNN convolutions, matrix products): a few float32 ulps of values of order 1, i.e.
# ~1e-6 after the softmax. 1e-5 leaves room for that and would still catch any real mixing
# between images (a batch statistic moves maps by 1e-2 and more; see the training-mode check).
TOLERANCE = 1e-5


def tiny_model(anomaly_map="discriminator"):
    """A tiny RealNet on a random backbone (layers 1-2), all weights and running statistics
    random, so that every part (UNets, RRS ranking, BatchNorm; with the fused map its
    calibration) shapes the map."""
    backbone = load_backbone("random", (1, 2))
    g = torch.Generator().manual_seed(0)
    afs = {
        "layers": [1, 2],
        "dims": [8, 16],
        "indices": [
            torch.randperm(256, generator=g)[:8].sort().values.tolist(),
            torch.randperm(512, generator=g)[:16].sort().values.tolist(),
        ],
        "scores": [torch.rand(256), torch.rand(512)],
        "input_size": SIZE,
        "backbone": backbone.identity,
    }
    model = RealNet(
        build_config(afs, width_ratio=0.5, strides=backbone.strides, anomaly_map=anomaly_map)
    )
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var") or name == "map_scale":
                tensor.uniform_(0.5, 2.0, generator=g)
            elif name == "map_weight":  # which parts count: all of them
                tensor.fill_(1.0)
            elif tensor.is_floating_point():
                # std 0.1: logits of order 1 (std 0.2 gives logits of 100+, which magnify
                # the ulp-level differences below 100-fold before the softmax)
                tensor.normal_(0.0, 0.1, generator=g)
    model.eval()
    return model, FeatureExtractor(backbone, model)


@pytest.fixture(scope="module")
def inference():
    return tiny_model()


def images(n, seed):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def maps_of(inference, batch, what="anomaly_map"):
    model, features = inference
    return model(features(batch), batch.shape[-2:])[what]


def test_an_images_map_does_not_depend_on_its_batch(inference):
    a, b, c, others = images(1, 1), images(1, 2), images(1, 3), images(3, 4)
    alone = maps_of(inference, a)[0]
    assert alone.std() > 1e-3  # a map with structure, not a constant
    for batch, position in (
        (torch.cat([a, b]), 0),
        (torch.cat([c, a]), 1),
        (torch.cat([others[:2], a, others[2:], b]), 2),
    ):
        in_batch = maps_of(inference, batch)[position]
        assert (in_batch - alone).abs().max() <= TOLERANCE, len(batch)
    # the same five images, one at a time and together
    five = torch.cat([a, b, c, others[:2]])
    together = maps_of(inference, five)
    one_by_one = torch.cat([maps_of(inference, image[None]) for image in five])
    assert (together - one_by_one).abs().max() <= TOLERANCE
    # and RRS keeps the same residual channels for each image
    indices = torch.cat([maps_of(inference, image[None], "rrs_indices") for image in five])
    assert torch.equal(maps_of(inference, five, "rrs_indices"), indices)


def test_in_training_mode_the_batch_does_matter(inference):
    """The check above can fail: with batch statistics (training mode) the same image gets
    another map next to other images."""
    model, features = inference
    a, b, c = images(1, 1), images(1, 2), images(1, 3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        with torch.no_grad():
            first = model(features(torch.cat([a, b])), (SIZE, SIZE))["anomaly_map"][0]
            second = model(features(torch.cat([a, c])), (SIZE, SIZE))["anomaly_map"][0]
    finally:
        model.eval()
        model.load_state_dict(state)  # training mode moved the running statistics
    assert (first - second).abs().max() > 100 * TOLERANCE
