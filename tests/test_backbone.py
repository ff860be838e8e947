"""realnet/backbone.py: layers, frozen eval mode, local weights, the offline error."""

import os

import pytest
import torch
import torchvision

from realnet import backbone
from realnet.cli import UserError


@pytest.fixture(scope="module")
def random_net():
    return backbone.load_backbone("random")


def test_layers_shapes_and_frozen(random_net):
    x = torch.randn(2, 3, 64, 64)
    features = random_net(x)
    assert [tuple(f.shape) for f in features] == [
        (2, 256, 16, 16),
        (2, 512, 8, 8),
        (2, 1024, 4, 4),
        (2, 2048, 2, 2),
    ]
    assert random_net.out_strides == [4, 8, 16, 32]
    random_net.train()
    assert not random_net.training and not any(m.training for m in random_net.modules())
    assert not any(p.requires_grad for p in random_net.parameters())
    assert not features[0].requires_grad
    assert random_net.identity == {
        "arch": "wide_resnet50_2",
        "weights": "random",
        "digest": "seed0",
    }


def test_random_is_the_same_network_every_time_and_stops_at_the_deepest_layer(random_net):
    torch.manual_seed(123)  # the caller's RNG state must not matter
    short = backbone.load_backbone("random", layers=(1, 2))
    assert not hasattr(short, "layer3") and not hasattr(short, "fc")
    x = torch.randn(1, 3, 64, 64)
    full = random_net(x)
    part = short(x)
    assert len(part) == 2 and all(torch.equal(a, b) for a, b in zip(part, full[:2]))
    assert len(backbone.load_backbone("random", layers=(3,))(x)) == 1
    with pytest.raises(UserError, match="ascending"):
        backbone.load_backbone("random", layers=(3, 1))


def test_random_backbone_warns_about_its_deep_layers(capsys):
    backbone.load_backbone("random", layers=(1, 2))
    assert "layer" not in capsys.readouterr().err.replace("UNTRAINED", "")
    backbone.load_backbone("random", layers=(1, 2, 3, 4))
    warning = [
        line for line in capsys.readouterr().err.splitlines() if "no usable anomaly signal" in line
    ]
    assert len(warning) == 1 and "layers 3, 4" in warning[0] and "--layers 1 2" in warning[0]


def test_local_weights_file(tmp_path, random_net):
    net = torchvision.models.wide_resnet50_2()
    state = {"module." + k: v for k, v in net.state_dict().items()}  # a DDP-style checkpoint
    path = str(tmp_path / "wide_resnet50_racm-8234f177.pth")
    torch.save({"state_dict": state}, path)
    loaded = backbone.load_backbone(path, layers=(1, 2))
    x = torch.randn(1, 3, 64, 64)
    net.eval()
    with torch.no_grad():
        expected = net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))
    # the same numbers up to float rounding (the backbone convolves in channels-last order)
    torch.testing.assert_close(
        loaded(x)[1], expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())
    )
    assert (
        loaded.identity["file"] == "wide_resnet50_racm-8234f177.pth"
        and len(loaded.identity["digest"]) == 16
    )


def test_weights_that_do_not_fit(tmp_path):
    path = str(tmp_path / "resnet18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(UserError, match="does not fit wide_resnet50_2") as e:
        backbone.load_backbone(path)
    assert "\n" not in str(e.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="not a readable torch file"):
        backbone.load_backbone(str(junk))
    with pytest.raises(UserError, match="is not a file"):
        backbone.load_backbone(str(tmp_path / "missing.pth"))


def test_imagenet_offline_names_the_file_and_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(backbone, "_reachable", lambda url, timeout=5.0: False)
    with pytest.raises(UserError) as e:
        backbone.load_backbone("imagenet")
    message = str(e.value)
    assert "wide_resnet50_2-95faca4d.pth" in message
    assert os.path.join(str(tmp_path / "hub"), "checkpoints") in message
    assert "--backbone-weights" in message and "random" in message and "\n" not in message


def test_imagenet_from_the_cache(tmp_path, monkeypatch):
    """A file in the cache is loaded without any network access."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(backbone, "_reachable", lambda *a, **k: pytest.fail("must not go online"))
    os.makedirs(tmp_path / "hub" / "checkpoints")
    torch.save(torchvision.models.wide_resnet50_2().state_dict(), backbone.imagenet_cache_path())
    net = backbone.load_backbone("imagenet", layers=(1,))
    assert (
        net.identity["weights"] == "imagenet"
        and net.identity["file"] == "wide_resnet50_2-95faca4d.pth"
    )
