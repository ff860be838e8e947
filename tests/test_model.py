"""realnet/model.py with tiny dimensions and random features (no backbone needed)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from realnet.features import FeatureExtractor
from realnet import model as M


@pytest.fixture(autouse=True, scope="module")
def small_convolutions_without_onednn():
    """oneDNN spends more time preparing each new tiny convolution than running it."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled


def fake_afs(layers=(1, 2, 3), dims=(8, 16, 16), channels=(12, 20, 24), input_size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = [
        torch.sort(torch.randperm(c, generator=g)[:d]).values for c, d in zip(channels, dims)
    ]
    return {
        "kind": "afs",
        "version": 1,
        "layers": list(layers),
        "dims": list(dims),
        "indices": indices,
        "scores": [torch.rand(c, generator=g) for c in channels],
        "input_size": input_size,
        "backbone": {"arch": "fake", "weights": "random", "digest": "0"},
        "category": "demo",
    }


def fake_backbone_features(
    batch, channels=(12, 20, 24), input_size=64, strides=(4, 8, 16), seed=0
):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, input_size // s, input_size // s, generator=g)
        for c, s in zip(channels, strides)
    ]


def test_architecture_matches_the_authors_parameter_counts():
    # the authors' code: block1 (256 ch) 51.85M, block2 (512 ch) 207.27M, RRS/discriminator 5.87M
    assert M.count_parameters(M.ReconstructionUNet(256)) == 51_846_144
    assert M.count_parameters(M.ReconstructionUNet(512)) == 207_271_936
    assert M.count_parameters(M.Discriminator(512)) == 5_872_662


def test_group_count_divides_small_widths():
    assert [M.group_count(c) for c in (256, 64, 48, 20, 7, 1)] == [32, 32, 24, 20, 7, 1]
    for c in range(1, 100):
        assert c % M.group_count(c) == 0 and M.group_count(c) <= 32


def test_default_k_is_a_sixth_of_the_channels_each():
    afs = fake_afs(
        layers=(1, 2, 3, 4),
        dims=(256, 512, 512, 256),
        channels=(256, 512, 1024, 2048),
        input_size=256,
    )
    config = M.build_config(afs)
    assert (config["k_max"], config["k_mean"]) == (256, 256)  # M = 1536, retention 1/3
    assert M.build_config(afs, arch="C")["levels"] == [[1, 2], [3, 4]]
    assert M.level_channels(M.build_config(afs, arch="C")) == [768, 768]


@pytest.mark.parametrize(
    "arch,layers,dims,channels,strides",
    [
        ("A", (1, 2, 3), (8, 16, 16), (12, 20, 24), (4, 8, 16)),
        ("C", (1, 2, 3, 4), (8, 8, 16, 8), (12, 20, 24, 28), (4, 8, 16, 32)),
    ],
)
def test_forward_backward_shapes(arch, layers, dims, channels, strides):
    size = 128 if arch == "C" else 64
    afs = fake_afs(layers, dims, channels, size)
    config = M.build_config(afs, arch=arch, width_ratio=1.0)
    model = M.RealNet(config)
    backbone = fake_backbone_features(4, channels, size, strides)
    features = FeatureExtractor(torch.nn.Identity(), model).select(backbone)
    assert [f.shape[1] for f in features] == M.level_channels(config)
    assert all(
        f.shape[-1] == size // strides[layers.index(group[0])]
        for f, group in zip(features, config["levels"])
    )
    out = model(features, (size, size))
    k = config["k_max"] + config["k_mean"]
    assert out["selected"].shape == (4, k, size // 4, size // 4)
    assert out["logits"].shape == (4, 2, size, size)
    assert out["anomaly_map"].shape == (4, size, size)
    assert all(
        torch.equal(r, torch.zeros_like(f)) for r, f in zip(out["reconstructions"], features)
    )  # zero init
    mask = (torch.rand(4, 1, size, size) > 0.9).float()
    loss, parts = M.realnet_loss(out, features, mask)
    loss.backward()
    assert torch.isfinite(loss)
    # every trainable parameter that can receive a gradient at init does (zero-initialised
    # output convs block the ones behind them until the first step)
    for g in model.reconstruction:
        assert g.out[2].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.discriminator.parameters())


def test_afs_keeps_the_chosen_channels():
    afs = fake_afs()
    model = M.RealNet(M.build_config(afs))
    backbone = fake_backbone_features(2)
    levels = FeatureExtractor(torch.nn.Identity(), model).select(backbone)
    for f, b, idx in zip(levels, backbone, afs["indices"]):
        assert torch.equal(f, b[:, idx])
    assert not any(
        k.startswith("afs_indices") for k in model.state_dict()
    )  # in the config, not the weights


def test_architecture_c_upsamples_the_coarser_layer():
    afs = fake_afs((1, 2), (4, 6), (5, 7), 64)
    model = M.RealNet(M.build_config(afs, arch="C"))
    backbone = fake_backbone_features(1, (5, 7), 64, (4, 8))
    (level,) = FeatureExtractor(torch.nn.Identity(), model).select(backbone)
    assert level.shape == (1, 10, 16, 16)
    up = F.interpolate(
        backbone[1][:, afs["indices"][1]], size=(16, 16), mode="bilinear", align_corners=True
    )
    assert torch.allclose(level[:, 4:], up)


def test_segmentation_loss_reaches_the_reconstruction_nets():
    torch.manual_seed(0)
    model = M.RealNet(M.build_config(fake_afs(), width_ratio=1.0))
    features = FeatureExtractor(torch.nn.Identity(), model).select(fake_backbone_features(4))
    for g in model.reconstruction:  # move away from the zero init so gradients pass through
        torch.nn.init.normal_(g.out[2].weight, std=0.01)
    out = model(features, (64, 64))
    mask = torch.zeros(4, 1, 64, 64)
    mask[:, :, 20:40, 20:40] = 1
    F.cross_entropy(out["logits"], mask[:, 0].long()).backward()
    assert model.reconstruction[0].encoder[0].weight.grad.abs().sum() > 0


def test_rrs_updates_running_statistics_only_in_training():
    model = M.RealNet(M.build_config(fake_afs()))
    features = FeatureExtractor(torch.nn.Identity(), model).select(fake_backbone_features(2))
    model(features, (64, 64))
    trained_mean = model.rrs.running_mean.clone()
    assert not torch.equal(trained_mean, torch.zeros_like(trained_mean))
    model.eval()
    model(features, (64, 64))
    assert torch.equal(model.rrs.running_mean, trained_mean)


def test_a_few_steps_lower_the_loss():
    """Features that differ inside the mask: the model learns to segment them."""
    torch.manual_seed(0)
    afs = fake_afs()
    model = M.RealNet(M.build_config(afs, width_ratio=1.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    clean = FeatureExtractor(torch.nn.Identity(), model).select(fake_backbone_features(8, seed=1))
    mask = torch.zeros(8, 1, 64, 64)
    mask[::2, :, 16:40, 24:48] = 1
    anomalous = []
    for f in clean:
        m = F.interpolate(mask, size=f.shape[-2:], mode="nearest")
        anomalous.append(f + 3.0 * m * torch.randn_like(f))
    losses, segmentation = [], []
    for _ in range(20):
        out = model(anomalous, (64, 64))
        loss, parts = M.realnet_loss(out, clean, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        segmentation.append(parts["segmentation"].item())
    assert losses[-1] < 0.8 * losses[0]
    assert segmentation[-1] < segmentation[0] - 0.05


def test_bad_configurations_are_refused():
    from realnet.cli import UserError

    with pytest.raises(UserError, match="--arch C pairs .* odd number"):
        M.build_config(fake_afs(), arch="C")
    with pytest.raises(ValueError, match="unknown architecture"):
        M.build_config(fake_afs(), arch="B")
    with pytest.raises(UserError, match="--k-max 1000"):
        M.build_config(fake_afs(), k_max=1000)
    unet = M.ReconstructionUNet(8)
    with pytest.raises(ValueError, match="cannot be halved"):
        unet(torch.randn(1, 8, 6, 6))


# ----------------------------------------------------------------------------------------
# The discriminator's BatchNorm under DDP: two gloo processes == one process
# ----------------------------------------------------------------------------------------


def _bn_worker(rank, world, store_path, x, grad_out, result_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world
    )
    torch.manual_seed(0)
    bn = M.GlobalBatchNorm2d(3)
    bn.process_group = dist.group.WORLD
    part = x.chunk(world)[rank].clone().requires_grad_(True)
    y = bn(part)
    (y * grad_out.chunk(world)[rank]).sum().backward()
    grads = [torch.zeros_like(part.grad) for _ in range(world)]
    dist.all_gather(grads, part.grad)
    weight_grad = bn.weight.grad.clone()
    dist.all_reduce(weight_grad)  # what DDP would sum (then average) over ranks
    if rank == 0:
        torch.save(
            {
                "y0": y.detach(),
                "x_grad": torch.cat(grads),
                "weight_grad": weight_grad,
                "running_mean": bn.running_mean,
                "running_var": bn.running_var,
            },
            result_path,
        )
    dist.destroy_process_group()


def test_global_batchnorm_in_two_processes_equals_one_process():
    torch.manual_seed(1)
    x = torch.randn(6, 3, 5, 5) * 2 + 1
    grad_out = torch.randn(6, 3, 5, 5)
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.pt")
        mp.spawn(_bn_worker, args=(2, os.path.join(tmp, "store"), x, grad_out, result), nprocs=2)
        got = torch.load(result)
    bn = torch.nn.BatchNorm2d(3)
    xr = x.clone().requires_grad_(True)
    y = bn(xr)
    (y * grad_out).sum().backward()
    assert torch.allclose(got["y0"], y[:3], atol=1e-5)
    assert torch.allclose(got["x_grad"], xr.grad, atol=1e-5)
    assert torch.allclose(got["weight_grad"], bn.weight.grad, atol=1e-4)
    assert torch.allclose(got["running_mean"], bn.running_mean, atol=1e-6)
    assert torch.allclose(got["running_var"], bn.running_var, atol=1e-5)


# ----------------------------------------------------------------------------------------
# The whole model under DDP: two gloo processes with half the batch each == one process
# ----------------------------------------------------------------------------------------


def _ddp_setup():
    torch.manual_seed(0)
    model = M.RealNet(M.build_config(fake_afs(), width_ratio=1.0))
    for g in model.reconstruction:  # past the zero init, so that every gradient is informative
        torch.nn.init.normal_(g.out[2].weight, std=0.01)
    features = FeatureExtractor(torch.nn.Identity(), model).select(
        fake_backbone_features(4, seed=3)
    )
    mask = torch.zeros(4, 1, 64, 64)
    mask[1::2, :, 10:30, 10:30] = 1
    return model, features, mask


def _ddp_worker(rank, store_path, result_path):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    torch.backends.mkldnn.enabled = False
    model, features, mask = _ddp_setup()
    model.set_process_group(dist.group.WORLD)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    half = slice(2 * rank, 2 * rank + 2)
    part = [f[half] for f in features]
    loss, _ = M.realnet_loss(ddp(part, (64, 64)), part, mask[half])
    loss.backward()  # DDP averages the gradients over the two processes
    if rank == 0:
        torch.save(
            {
                "grads": {k: p.grad for k, p in model.named_parameters()},
                "buffers": {k: b for k, b in model.named_buffers()},
            },
            result_path,
        )
    dist.destroy_process_group()


def test_ddp_gradients_and_statistics_equal_one_process():
    model, features, mask = _ddp_setup()
    loss, _ = M.realnet_loss(model(features, (64, 64)), features, mask)
    loss.backward()
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.pt")
        mp.spawn(_ddp_worker, args=(os.path.join(tmp, "store"), result), nprocs=2)
        got = torch.load(result)
    compared = 0
    for name, p in model.named_parameters():
        if (
            p.grad.norm() < 1e-6
        ):  # rounding-noise level (e.g. a bias before a per-channel GroupNorm)
            continue
        assert torch.allclose(
            got["grads"][name], p.grad, rtol=1e-3, atol=1e-3 * p.grad.abs().max()
        ), name
        compared += 1
    assert compared > 0.6 * len(list(model.parameters()))  # zero-initialised layers block the rest
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point():  # RRS and BatchNorm running statistics of the global batch
            assert torch.allclose(got["buffers"][name], buffer, rtol=1e-4, atol=1e-6), name


def test_k_and_input_sizes_the_model_cannot_use_are_refused_in_one_line():
    from realnet.cli import UserError

    afs = fake_afs(layers=(1, 2), dims=(8, 16), channels=(256, 512), input_size=64)
    with pytest.raises(UserError, match=r"^--k-max 1000 --k-mean 4: each must be in \[0, 24\]"):
        M.build_config(afs, k_max=1000)
    with pytest.raises(
        UserError, match=r"^--input-size 60: layer1's feature map \(60/4\).*multiple of 16"
    ):
        M.build_config(afs, input_size=60)
    with pytest.raises(UserError, match="layer2's .*multiple of 32"):
        M.build_config(afs, input_size=48)  # layer1 (12x12) halves twice, layer2 (6x6) not
    assert M.build_config(afs, arch="C", input_size=48)["input_size"] == 48  # C: layer1's size


def test_fused_map_is_the_weighted_mean_of_the_scaled_log_odds_and_energies():
    afs = fake_afs()
    model = M.RealNet(M.build_config(afs, anomaly_map="fused")).eval()
    paper = M.RealNet(M.build_config(afs))
    assert not paper.fused and "map_centre" not in paper.state_dict()
    assert model.state_dict()["map_scale"].shape == (4,)  # discriminator + 3 levels
    assert model.part_names() == [
        "discriminator log-odds",
        "level 1 energy",
        "level 2 energy",
        "level 3 energy",
    ]
    features = FeatureExtractor(torch.nn.Identity(), model).select(fake_backbone_features(3))
    with torch.no_grad():
        for g in model.reconstruction:  # non-zero reconstructions: energies that differ
            torch.nn.init.normal_(g.out[2].weight, std=0.1)
        out = model(features, (64, 64))
    parts = out["map_parts"]
    assert parts.shape == (3, 4, 64, 64)
    torch.testing.assert_close(parts[:, 0], out["logits"][:, 1] - out["logits"][:, 0])
    for level, (f, r) in enumerate(zip(features, out["reconstructions"]), start=1):
        energy = F.interpolate(((f - r) ** 2).sum(1, keepdim=True), size=(64, 64), mode="bilinear")
        torch.testing.assert_close(parts[:, level], energy[:, 0])
    # uncalibrated: centre 0, scale 1, every part counts: the parts' plain mean
    torch.testing.assert_close(out["anomaly_map"], parts.mean(1))
    centre, scale = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 1.0, 2.0, 4.0])
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0])  # level 2 dropped
    model.map_centre.copy_(centre), model.map_scale.copy_(scale), model.map_weight.copy_(weight)
    fused = model(features, (64, 64))["anomaly_map"]
    expected = sum((parts[:, p] - centre[p]) / scale[p] for p in (0, 1, 3)) / 3
    torch.testing.assert_close(fused, expected)
    # the calibration buffers travel with the checkpoint
    again = M.RealNet(model.config)
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again.eval()(features, (64, 64))["anomaly_map"], fused)
    # training never computes the fused map (nothing uses it there)
    assert "map_parts" not in model.train()(features, (64, 64))
    with pytest.raises(ValueError, match="unknown anomaly map"):
        M.build_config(afs, anomaly_map="energy")
