"""The README's first quick-start command, demo.sh, at the smallest scale: all five stages in
order, each reading what the one before wrote, so that CI catches a broken hand-off.
(The set-up part of demo.sh, pip and the extension build, is what .ci/run itself does.)"""

import glob
import json
import os
import subprocess

import pytest
import torch

from demo_data import make_demo_dataset, make_demo_textures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORY = "washer"


def run_demo(root, out):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "SETUP": "0",
        "CATEGORY": CATEGORY,
        "DATA": str(root / "data"),
        "DTD": str(root / "dtd"),
        "OUT": str(out),
        "SIZE": "64",
        "DIFFUSION_SIZE": "16",
        "DIFFUSION_STEPS": "3",
        "SDAS_COUNT": "4",
        "AFS_BATCHES": "1",
        "TRAIN_STEPS": "4",
    }
    result = subprocess.run(
        ["bash", os.path.join(REPO, "demo.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (
        f"demo.sh failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    make_demo_dataset(
        str(root / "data"),
        categories=[CATEGORY],
        image_size=64,
        n_train=8,
        n_test_good=3,
        n_test_defect=4,
    )
    make_demo_textures(str(root / "dtd"), n=1)
    out = root / "runs"
    return root, out, run_demo(root, out)


def test_every_stage_runs_and_hands_its_output_to_the_next(pipeline):
    root, out, stdout = pipeline
    # 1 -> 2: the diffusion checkpoint and its sample sheet
    diffusion = torch.load(out / "diffusion" / "model.pt", map_location="cpu", weights_only=False)
    assert (
        diffusion["kind"] == "diffusion"
        and diffusion["step"] == 3
        and diffusion["classes"] == [CATEGORY]
    )
    assert glob.glob(str(out / "diffusion" / "samples" / "*.png"))
    # 2 -> 3, 4: the SDAS images, made from that checkpoint
    sdas = json.load(open(out / "sdas" / "manifest.json"))
    assert sdas["count"] == 4 and len(glob.glob(str(out / "sdas" / "*.png"))) == 4
    assert os.path.samefile(sdas["checkpoint"], out / "diffusion" / "model.pt")
    assert 0.1 <= sdas["strength_stats"]["min"] <= sdas["strength_stats"]["max"] <= 0.2
    assert (out / "sdas" / "preview" / "contact_sheet.png").is_file()
    # 3 -> 4: the AFS file, computed with anomalies from those SDAS images
    afs = torch.load(out / "afs.pt", map_location="cpu", weights_only=False)
    assert (
        afs["kind"] == "afs"
        and afs["layers"] == [1, 2]
        and [len(i) for i in afs["indices"]] == [64, 128]
    )
    assert (
        afs["anomaly_source"]["sdas_images"] == 4 and afs["anomaly_source"]["foreground"] == "none"
    )
    assert afs["anomaly_source"]["min_paste_contrast"] == 1.5  # demo.sh's, beyond the paper
    assert (out / "afs_scores.png").is_file()
    # 4 -> 5: the RealNet checkpoint, trained with that AFS file and both anomaly sources
    args = json.load(open(out / "realnet" / "args.json"))
    assert args["min_paste_contrast"] == 1.5  # taken from the AFS file
    assert args["discriminator_lr_scale"] == 3  # demo.sh's, beyond the paper
    assert os.path.samefile(args["afs"], out / "afs.pt") and os.path.samefile(
        args["sdas"], out / "sdas"
    )
    # 5: honest metrics of that checkpoint, and pictures
    metrics = json.load(open(out / "eval" / "metrics.json"))
    # ... of the step chosen on held-out training images, never on the test set
    assert os.path.samefile(metrics["checkpoint"]["path"], out / "realnet" / "best.pt")
    assert "held-out TRAINING images" in metrics["checkpoint"]["selected_on"]["rule"]
    m = metrics["categories"][CATEGORY]
    for key in ("image_auroc", "pixel_auroc", "au_pro"):
        assert 0.0 <= m[key] <= 1.0, (key, m[key])
    assert len(glob.glob(str(out / "eval" / "panels" / CATEGORY / "*.png"))) == m["images"] == 7


def test_it_prints_stage_times_metrics_and_where_the_pictures_are(pipeline):
    _, out, stdout = pipeline
    times = stdout[stdout.index("=== stage times") :]
    for stage in (
        "1 diffusion",
        "2 synthesize",
        "3 select features",
        "4 train RealNet",
        "5 evaluate",
        "total",
    ):
        assert stage in times
    assert f"=== {CATEGORY}: image AUROC" in stdout
    for picture in ("panels", "contact_sheet.png", "afs_scores.png", "samples"):
        assert picture in times


def test_a_second_run_resumes_instead_of_starting_over(pipeline):
    root, out, _ = pipeline
    before = {
        p: os.path.getmtime(p)
        for p in (
            out / "diffusion" / "model.pt",
            out / "afs.pt",
            out / "sdas" / f"{CATEGORY}_00000.png",
        )
    }
    stdout = run_demo(root, out)
    assert "already at step 3" in stdout  # diffusion: nothing left to train
    assert "is there already" in stdout  # AFS kept
    assert "0 to make" in stdout  # SDAS images kept
    for path, mtime in before.items():
        assert os.path.getmtime(path) == mtime, path
