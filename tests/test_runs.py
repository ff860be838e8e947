"""realnet/runs.py: the saved-settings check names what differs, logs trim to a step, RNG
states round-trip, and a file made with other backbone weights is refused."""

import json
import random

import numpy as np
import pytest
import torch

from realnet.backbone import load_recorded_backbone
from realnet import cli, runs
from realnet.cli import UserError
from realnet.files import atomic_torch_save, load_checkpoint


def test_require_same_settings_names_every_difference():
    before = {"lr": 0.001, "training": {"batch_size": 4, "seed": 0}, "gone": 1}
    now = {"lr": 0.002, "training": {"batch_size": 4, "seed": 1}}
    assert runs.differences(before, before) == []
    with pytest.raises(UserError) as e:
        runs.require_same_settings(
            before, now, "'x' was made with other settings", "choose another --out"
        )
    message = str(e.value)
    assert message.startswith("'x' was made with other settings (") and message.endswith(
        "; choose another --out"
    )
    for part in (
        "lr: 0.001 there, 0.002 now",
        "training.seed: 0 there, 1 now",
        "gone: 1 there, None now",
    ):
        assert part in message
    assert "batch_size" not in message


def test_load_state_never_overwrites_silently(tmp_path, capsys):
    assert runs.load_state(str(tmp_path), resume=True, kind="x") is None
    assert "starting from step 0" in capsys.readouterr().out
    torch.save({"kind": "x", "step": 3}, tmp_path / runs.STATE_FILE)
    with pytest.raises(UserError, match="--resume"):
        runs.load_state(str(tmp_path), resume=False, kind="x")
    assert runs.load_state(str(tmp_path), resume=True, kind="x")["step"] == 3


def test_logs_are_trimmed_to_the_resumed_step(tmp_path):
    path = tmp_path / runs.LOG_FILE
    with open(path, "w") as f:
        for step in (1, 2, 3):
            runs.log_line(f, {"step": step, "loss": 1.0 / step})
        f.write('{"step": 4, "lo')  # a line cut by a kill
    assert [e["step"] for e in runs.read_log(path)] == [1, 2, 3]
    runs.trim_log(path, 2)
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2]


def test_rng_state_round_trip(tmp_path):
    np.random.normal()  # numpy caches the second Gaussian: part of its state
    atomic_torch_save({"rng": runs.rng_state()}, str(tmp_path / "state.pt"))
    state = load_checkpoint(str(tmp_path / "state.pt"), "state")["rng"]  # weights_only=True
    drawn = (torch.rand(3), np.random.rand(3), random.random())
    runs.restore_rng(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert (
        torch.equal(drawn[0], again[0])
        and np.array_equal(drawn[1], again[1])
        and drawn[2] == again[2]
    )
    runs.restore_rng(state)
    assert np.random.normal() == (runs.restore_rng(state), np.random.normal())[1]


def test_a_flag_in_the_settings_is_named_as_typed():
    before, now = (
        {"training": {"--lr": 0.001, "train_images": 8}},
        {"training": {"--lr": 0.002, "train_images": 9}},
    )
    assert runs.differences(before, now) == [
        "--lr: 0.001 there, 0.002 now",
        "training.train_images: 8 there, 9 now",
    ]


def _trained_a_step(device):
    """A model and its Adam optimiser on `device`, after one step (moments exist)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3, device=device)).square().mean().backward()
    optimizer.step()
    return model, optimizer


RESUME_DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", RESUME_DEVICES)
def test_a_restored_training_state_lives_on_the_models_device(tmp_path, device):
    """A state is read onto the CPU; every restored tensor must end where the model lives.
    Without a GPU the 'meta' device stands in for CUDA: the same code path."""
    model, optimizer = _trained_a_step("cpu")
    atomic_torch_save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
        str(tmp_path / "state.pt"),
    )
    state = load_checkpoint(str(tmp_path / "state.pt"), "state")
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).to(device)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    runs.restore_training(fresh, fresh_optimizer, state)
    assert runs.misplaced_tensors(fresh, fresh_optimizer) == []
    moments = [
        v for entry in fresh_optimizer.state.values() for v in entry.values() if v.dim() > 0
    ]
    assert len(moments) == 2 * len(list(fresh.parameters()))
    assert all(v.device.type == device for v in moments + list(fresh.state_dict().values()))
    # the check can fail: a moment on the CPU, and an optimiser made before the model moved
    next(iter(fresh_optimizer.state.values()))["exp_avg"] = torch.zeros(4, 3)
    assert "exp_avg: on cpu" in runs.misplaced_tensors(fresh, fresh_optimizer)[0]
    late, late_optimizer = _trained_a_step("cpu")
    late_optimizer.load_state_dict(
        state["optimizer"]
    )  # the crash on an H100: restored, then moved
    late.to(device)
    assert runs.misplaced_tensors(late, late_optimizer)


def test_a_file_made_with_other_backbone_weights_is_refused():
    recorded = {"arch": "wide_resnet50_2", "weights": "imagenet", "digest": "0123456789abcdef"}
    with pytest.raises(UserError, match="0123456789abcdef.*--backbone-weights"):
        load_recorded_backbone(recorded, "random", (1,), "--afs 'a.pt'")
    random_identity = {"arch": "wide_resnet50_2", "weights": "random", "digest": "seed0"}
    assert (
        load_recorded_backbone(random_identity, None, (1,), "--afs 'a.pt'").identity
        == random_identity
    )


def test_cli_helpers():
    assert cli.flag("batch_size") == "--batch-size"
    assert cli.only_category(None, ["washer"], "'data'") == "washer"
    assert cli.only_category("tablet", ["washer", "tablet"], "'data'") == "tablet"
    with pytest.raises(UserError, match="--category is needed: 'data' has 2 categories: a, b"):
        cli.only_category(None, ["a", "b"], "'data'")
    with pytest.raises(UserError, match="--steps must be >= 1"):
        cli.require_positive(batch_size=4, steps=0)
