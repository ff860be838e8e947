"""train_diffusion.py and synthesize.py under torchrun: 2 CPU ranks (gloo) give what one
process gives."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from test_sdas_scripts import ROOT, TINY, load, make_toy_dataset, pixels, run


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"))


def torchrun(script, *args):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            os.path.join(ROOT, script),
            *map(str, args),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_torchrun_two_ranks_train_like_one_process_and_shard_synthesis(toy, tmp_path):
    common = [
        "--data",
        toy,
        "--steps",
        2,
        "--batch-size",
        4,
        "--lr",
        "1e-3",
        "--log-every",
        1,
        "--sample-every",
        0,
        *TINY,
    ]
    run("train_diffusion.py", "--out", tmp_path / "one", *common)
    proc = torchrun("train_diffusion.py", "--out", tmp_path / "two", *common)
    assert "2 rank(s)" in proc.stdout
    one = load(tmp_path / "one" / "model.pt")["ema"]
    two = load(tmp_path / "two" / "model.pt")["ema"]
    # Same samples, timesteps and noise, gradients averaged over the ranks: the same weights up
    # to float summation order (which Adam amplifies where a gradient is ~0; one step is 1e-3).
    for k in one:
        assert (one[k] - two[k]).abs().max() < 1e-4, k
    ckpt = tmp_path / "two" / "model.pt"
    torchrun(
        "synthesize.py",
        "--checkpoint",
        ckpt,
        "--category",
        "disc",
        "--count",
        5,
        "--batch-size",
        2,
        "--steps",
        4,
        "--out",
        tmp_path / "sdas2",
    )
    run(
        "synthesize.py",
        "--checkpoint",
        ckpt,
        "--category",
        "disc",
        "--count",
        5,
        "--batch-size",
        2,
        "--steps",
        4,
        "--out",
        tmp_path / "sdas1",
    )
    assert sorted(os.listdir(tmp_path / "sdas2")) == sorted(
        os.listdir(tmp_path / "sdas1")
    )  # no rank files left
    m2 = json.load(open(tmp_path / "sdas2" / "manifest.json"))
    m1 = json.load(open(tmp_path / "sdas1" / "manifest.json"))
    assert m2["images"] == m1["images"]
    for i in range(5):  # rank 0 made 0, 2, 4 and rank 1 made 1, 3: the same images as one process
        a = pixels(tmp_path / "sdas2" / f"disc_{i:05d}.png")
        assert np.abs(a - pixels(tmp_path / "sdas1" / f"disc_{i:05d}.png")).max() <= 1
