"""select_features.py: AFS picks the channels that see the anomaly; files; resume; errors."""

import io
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import select_features
from realnet import anomalies, data, stream
from realnet.cli import UserError
from demo_data import make_demo_dataset, make_demo_textures
from realnet.files import load_checkpoint
from tiny_data import mvtec_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("afs")
    make_demo_dataset(
        str(root / "demo"),
        categories=["washer", "granite"],
        image_size=SIZE,
        n_train=6,
        n_test_good=1,
        n_test_defect=1,
    )
    make_demo_textures(str(root / "dtd"), n=2)
    return {"data": str(root / "demo"), "dtd": str(root / "dtd"), "root": root}


class FakeBackbone(torch.nn.Module):
    """Two 'layers': some channels are the image itself (average-pooled), so they change
    exactly where the anomaly was pasted; the others are fresh noise on every call."""

    layers = (1, 2)
    out_channels = [6, 4]
    responsive = ([1, 3, 5], [0, 3])

    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        features = []
        for stride, channels, responsive in zip((4, 8), self.out_channels, self.responsive):
            pooled = F.avg_pool2d(x, stride)
            maps = [
                torch.rand(pooled[:, :1].shape, generator=self.generator) * 3
                for _ in range(channels)
            ]
            for k, c in enumerate(responsive):
                maps[c] = pooled[:, k % 3 : k % 3 + 1]
            features.append(torch.cat(maps, dim=1))
        return features


def test_afs_keeps_the_channels_that_see_the_anomaly(demo):
    ds = data.open_dataset(demo["data"])
    synth = anomalies.AnomalySynthesizer("granite", ds.format, SIZE, dtd_dir=demo["dtd"])
    samples = stream.AnomalyStream(
        ds.train("granite"), SIZE, {"granite": synth}, seed=0, normal_ratio=0.0
    )
    loader = torch.utils.data.DataLoader(
        samples, batch_size=8, sampler=stream.StreamSampler(0, 4, 8)
    )
    sums, timing = select_features.channel_scores(FakeBackbone(), loader, torch.device("cpu"), 4)
    assert [len(s) for s in sums] == [6, 4] and set(timing) == {"data", "backbone", "loss"}
    for total, dim, responsive in zip(sums, (3, 2), FakeBackbone.responsive):
        kept, _ = select_features.select_channels(total.float(), dim)
        assert kept.tolist() == responsive
        assert (
            total[responsive].max()
            < total[[c for c in range(len(total)) if c not in responsive]].min()
        )


def test_select_channels_nan_ties_and_order():
    score = torch.tensor([0.5, float("nan"), 0.1, 0.3, 0.3, 0.9])
    kept, cleaned = select_features.select_channels(score, 3)
    assert kept.tolist() == [2, 3, 4]  # ascending, ties to the lower index
    assert cleaned[1] == 0.9  # NaN -> the largest finite score
    assert select_features.select_channels(score, 6)[0].tolist() == list(range(6))
    assert select_features.select_channels(torch.full((4,), float("nan")), 2)[0].tolist() == [0, 1]


def _run(args, demo, out):
    select_features.main(
        [
            "--data",
            demo["data"],
            "--category",
            "washer",
            "--dtd",
            demo["dtd"],
            "--input-size",
            "32",
            "--batches",
            "4",
            "--batch-size",
            "2",
            "--backbone-weights",
            "random",
            "--workers",
            "0",
            "--layers",
            "1",
            "2",
            "--dims",
            "8",
            "16",
            "--out",
            out,
        ]
        + args
    )
    return load_checkpoint(os.path.join(out, "afs.pt"), "AFS file", kind="afs")


def test_end_to_end_files_and_resume(demo, monkeypatch, capsys):
    out = str(demo["root"] / "run")
    afs = _run(["--dump", "2"], demo, out)
    assert afs["layers"] == [1, 2] and afs["dims"] == [8, 16]
    for kept, score, dim, channels in zip(afs["indices"], afs["scores"], afs["dims"], (256, 512)):
        assert (
            kept.dtype == torch.int64
            and len(kept) == dim
            and kept.tolist() == sorted(set(kept.tolist()))
        )
        assert score.shape == (channels,) and torch.isfinite(score).all()
        assert (
            score[kept].max()
            <= score[[i for i in range(channels) if i not in set(kept.tolist())]].min()
        )
    assert (
        afs["backbone"]["weights"] == "random"
        and afs["input_size"] == 32
        and afs["category"] == "washer"
    )
    assert afs["dataset"]["class_id"] == 1 and afs["args"]["batches"] == 4
    folder = demo["root"] / "run"
    assert {"afs.pt", "afs_scores.png", "afs_args.json"} <= set(os.listdir(folder))
    assert os.path.isfile(folder / "afs_examples" / "contact_sheet.png")
    assert not os.path.exists(folder / "afs.partial")

    # interrupted after batch 3 (a partial state saved after batch 2), then started again
    out2 = demo["root"] / "resumed"
    original_update = select_features.Progress.update

    def interrupt(self, step, *a, **k):
        original_update(self, step, *a, **k)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(select_features.Progress, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(["--save-every", "2"], demo, str(out2))
    monkeypatch.setattr(select_features.Progress, "update", original_update)
    assert not os.path.exists(out2 / "afs.pt") and os.path.exists(out2 / "afs.partial")
    capsys.readouterr()
    resumed = _run(["--save-every", "2"], demo, str(out2))
    assert "resuming from" in capsys.readouterr().out
    for a, b in zip(afs["scores"], resumed["scores"]):
        assert torch.equal(a, b)  # exactly the uninterrupted result


def _cli(*args):
    return subprocess.run(
        [sys.executable, "select_features.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _bad_trees(tmp_path):
    """Faults of the training images (the test split and its masks are evaluate.py's)."""
    empty = mvtec_tree(str(tmp_path / "empty"), categories=("bottle",))
    for name in os.listdir(os.path.join(empty, "bottle", "train", "good")):
        os.remove(os.path.join(empty, "bottle", "train", "good", name))
    truncated = mvtec_tree(str(tmp_path / "truncated"), categories=("bottle",))
    path = os.path.join(truncated, "bottle", "train", "good", "001.png")
    content = open(path, "rb").read()
    with open(path, "wb") as f:  # the header reads; the pixels are cut short
        f.write(content[: len(content) // 2])
    unreadable = mvtec_tree(str(tmp_path / "unreadable"), categories=("bottle",))
    with open(os.path.join(unreadable, "bottle", "train", "good", "000.png"), "wb") as f:
        f.write(b"\x89PNG garbage")
    (tmp_path / "layout").mkdir()
    (tmp_path / "layout" / "notes.txt").write_text("no images here")
    (tmp_path / "empty_dtd" / "images" / "banded").mkdir(parents=True)
    return {"empty": empty, "truncated": truncated, "unreadable": unreadable}


def _cases(demo, tmp_path):
    trees = _bad_trees(tmp_path)
    dtd = ["--dtd", demo["dtd"]]
    return {
        "does not exist": ["--data", str(tmp_path / "missing")] + dtd,
        "unknown layout": ["--data", str(tmp_path / "layout")] + dtd,
        "no anomaly source": ["--data", demo["data"], "--category", "washer"],
        "has no images": [
            "--data",
            demo["data"],
            "--category",
            "washer",
            "--dtd",
            str(tmp_path / "empty_dtd"),
        ],
        "layer4, which has 2048": ["--data", demo["data"], "--dims", "256", "512", "512", "4096"]
        + dtd,
        "--category is needed": ["--data", demo["data"]] + dtd,
        "no training images": ["--data", trees["empty"]] + dtd,
        "image file is truncated": ["--data", trees["truncated"]] + dtd,
        "is not a readable image": ["--data", trees["unreadable"]] + dtd,
        "expected auto, cpu, cuda": ["--data", demo["data"], "--device", "tpu"] + dtd,
    }


def test_bad_input_raises_user_error(demo, tmp_path):
    for expected, args in _cases(demo, tmp_path).items():
        with pytest.raises(UserError, match=re.escape(expected)):
            select_features.main(args + ["--out", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out" / "afs.pt")


def test_bad_input_is_one_line_without_traceback(demo, tmp_path):
    """As the user sees it: the script in a process of its own (a few cases: each costs an
    interpreter start with torch)."""
    cases = _cases(demo, tmp_path)
    for expected in (
        "does not exist",
        "has no images",
        "image file is truncated",
        "layer4, which has 2048",
    ):
        result = _cli(*cases[expected], "--out", str(tmp_path / "out"))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (expected, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (
            expected,
            result.stderr,
        )
    assert not os.path.exists(tmp_path / "out" / "afs.pt")


def _snapshot(folder):
    """Every file under `folder` with its bytes."""
    return {
        os.path.relpath(os.path.join(parent, name), folder): open(
            os.path.join(parent, name), "rb"
        ).read()
        for parent, _, names in os.walk(folder)
        for name in names
    }


def test_what_train_realnet_could_not_use_is_refused_before_any_file(demo, tmp_path):
    out = tmp_path / "out"
    base = [
        "--data",
        demo["data"],
        "--category",
        "washer",
        "--dtd",
        demo["dtd"],
        "--backbone-weights",
        "random",
    ]
    # 60 px: layer1's 15x15 map cannot be halved twice by its reconstruction UNet
    with pytest.raises(UserError, match=re.escape("--input-size 60") + ".*multiple of 16"):
        select_features.main(
            base + ["--input-size", "60", "--layers", "1", "--dims", "8", "--out", str(out)]
        )
    assert not out.exists()
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(UserError, match="--out .*a_file' is a file, expected a folder"):
        select_features.main(
            base
            + [
                "--input-size",
                "32",
                "--layers",
                "1",
                "--dims",
                "8",
                "--out",
                str(tmp_path / "a_file"),
            ]
        )
    assert (tmp_path / "a_file").read_text() == "mine"
    (tmp_path / "earlier" / "afs.pt").mkdir(parents=True)  # an earlier run's --out earlier/afs.pt
    with pytest.raises(
        UserError, match="afs.pt' is a folder, but the stage writes its file afs.pt"
    ):
        select_features.main(
            base
            + [
                "--input-size",
                "32",
                "--layers",
                "1",
                "--dims",
                "8",
                "--out",
                str(tmp_path / "earlier"),
            ]
        )


def test_a_failed_or_different_rerun_keeps_the_previous_afs_file(demo, tmp_path):
    out = str(tmp_path / "run")
    _run([], demo, out)
    before = _snapshot(out)
    assert {"afs.pt", "afs_args.json", "afs_scores.png"} <= set(before)
    with pytest.raises(UserError, match="--backbone-weights"):
        _run(["--backbone-weights", str(tmp_path / "missing.pth")], demo, out)
    assert _snapshot(out) == before  # afs_args.json still describes afs.pt
    with pytest.raises(UserError, match=re.escape("--dims: [8, 16] there, [4, 16] now")):
        select_features.main(
            [
                "--data",
                demo["data"],
                "--category",
                "washer",
                "--dtd",
                demo["dtd"],
                "--input-size",
                "32",
                "--batches",
                "4",
                "--batch-size",
                "2",
                "--backbone-weights",
                "random",
                "--workers",
                "0",
                "--layers",
                "1",
                "2",
                "--dims",
                "4",
                "16",
                "--out",
                out,
            ]
        )
    assert _snapshot(out) == before
    # the same settings again (another --workers or --dump): allowed
    again = _run(["--dump", "1"], demo, out)
    first = torch.load(io.BytesIO(before["afs.pt"]), weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(again["scores"], first["scores"]))
    assert os.path.isfile(os.path.join(out, "afs_examples", "contact_sheet.png"))
