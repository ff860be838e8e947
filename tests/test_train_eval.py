"""train_realnet.py and evaluate.py end to end on a tiny demo data set (64 px, random
backbone, layers 1-2): the loss falls, a killed run resumes to the same weights, two DDP
processes train the same model as one, and bad inputs get one-line errors."""

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import evaluate
import train_realnet
from realnet import calibration, runs
from realnet import data as realnet_data
from realnet.inference import load_model
from realnet.cli import UserError
from stages import ENV, REPO, one_line_error, run, train_args
from tiny_data import SIZE, write_afs


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def state_dict(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


# ----------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------


def test_training_loss_falls_then_evaluation_reports_everything(demo):
    out = str(demo["root"] / "run")
    result = run(
        "train_realnet.py",
        *train_args(
            demo, out, "--val-fraction", "0.25", "--val-every", "10", "--dump", "2", steps=30
        ),
    )
    assert "img/s" in result.stdout and "left" in result.stdout  # progress lines
    losses = [entry["loss"] for entry in read_jsonl(os.path.join(out, "loss.jsonl"))]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    for name in (
        "model.pt",
        "state.pt",
        "best.pt",
        "args.json",
        "val.jsonl",
        "examples/contact_sheet.png",
    ):
        assert os.path.isfile(os.path.join(out, name)), name
    model = torch.load(os.path.join(out, "model.pt"), weights_only=False)
    assert model["kind"] == "realnet" and model["step"] == 30
    assert not any(
        k.startswith(("conv1", "layer", "bn1")) for k in model["state_dict"]
    )  # no backbone weights
    best = torch.load(os.path.join(out, "best.pt"), weights_only=False)
    assert "held-out TRAINING images" in best["selected_on"]["rule"]
    held_out = best["selected_on"]["held_out_images"]
    assert len(held_out) == 2 and all(
        os.sep + os.path.join("washer", "train", "good") in p for p in held_out
    )
    assert len(read_jsonl(os.path.join(out, "val.jsonl"))) == 3
    curve = Image.open(
        os.path.join(out, "learning_curve.png")
    )  # validation metrics over loss, by step
    assert curve.size == (640, 480) and len(set(curve.convert("RGB").getdata())) > 3

    result = run(
        "evaluate.py",
        "--checkpoint",
        os.path.join(out, "model.pt"),
        "--workers",
        "0",
        "--batch-size",
        "8",
        "--throughput-repeats",
        "1",
    )
    report = json.load(open(os.path.join(out, "eval", "metrics.json")))
    washer = report["categories"]["washer"]
    for name in ("image_auroc", "pixel_auroc", "au_pro"):
        assert 0.0 <= washer[name] <= 1.0
    assert washer["images"] == 7 and washer["anomalous"] == 4
    assert set(washer["per_defect"]) == {"bent", "chip", "rust", "scratch"}
    # trained with --val-fraction: the pictures use the calibrated threshold (no test labels)
    assert "stored in the checkpoint" in washer["picture_threshold"]["chosen_on"]
    on_test = washer["calibration_on_test"]
    assert 0 <= on_test["balanced_accuracy"] <= on_test["best_balanced_accuracy"] <= 1
    assert report["protocol"]["auroc_flipped"] is False
    assert report["throughput"]["images_per_s"] > 0 and report["throughput"]["batch"] == 7
    with open(os.path.join(out, "eval", "scores.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and {r["label"] for r in rows} == {"0", "1"}
    assert {r["decision"] for r in rows} <= {"OK", "NG"} and all(r["decision"] for r in rows)
    assert len(os.listdir(os.path.join(out, "eval", "panels", "washer"))) == 7
    assert "washer" in result.stdout and "throughput" in result.stdout

    predict_dir = os.path.join(out, "unlabeled")
    os.makedirs(predict_dir)
    for defect, name in (("chip", "000.png"), ("good", "001.png")):
        shutil.copy(
            os.path.join(demo["data"], "washer", "test", defect, "000.png"),
            os.path.join(predict_dir, name),
        )
    run(
        "evaluate.py",
        "--checkpoint",
        os.path.join(out, "model.pt"),
        "--predict",
        predict_dir,
        "--workers",
        "0",
        "--pixel-threshold",
        "0.5",
        "--out",
        os.path.join(out, "predicted"),
        "--throughput-repeats",
        "1",
    )
    with open(os.path.join(out, "predicted", "predictions.csv")) as f:
        assert len(list(csv.DictReader(f))) == 2
    assert sorted(os.listdir(os.path.join(out, "predicted", "pictures"))) == [
        "000.png.jpg",
        "001.png.jpg",
    ]


def test_fused_map_is_calibrated_on_the_held_out_images_and_reported(demo):
    out = str(demo["root"] / "fused")
    line = one_line_error(
        run("train_realnet.py", *train_args(demo, out, "--anomaly-map", "fused"), check=False)
    )
    assert "--anomaly-map fused" in line and "--val-fraction" in line
    result = run(
        "train_realnet.py",
        *train_args(
            demo,
            out,
            "--anomaly-map",
            "fused",
            "--val-fraction",
            "0.25",
            "--val-every",
            "5",
            "--precision",
            "bf16",
            steps=10,
        ),
    )
    # the end-of-training line gives best.pt's thresholds (what the README evaluates)
    assert "best.pt: OK/NG: image score >=" in result.stdout
    assert "rests on 2 good image(s)" in result.stdout  # too few: said in one line
    best = torch.load(os.path.join(out, "best.pt"), weights_only=False)
    record = best["calibration"]
    assert best["config"]["anomaly_map"] == "fused" and record["rule"] == "normal"
    # trained in bf16, calibrated in fp32 (--calibrate-precision: what evaluate.py runs)
    assert record["precision"] == "fp32" and record["good_images"] == 2
    # the calibration is that of the held-out training images, each once: refitting on them
    # reproduces it (on any other image, a test image say, it would differ)
    model, features, _ = load_model(os.path.join(out, "best.pt"), None, torch.device("cpu"))
    samples = [
        s
        for s in realnet_data.open_recorded_dataset(None, "auto", best["dataset"], "test").train(
            "washer"
        )
        if s.image in best["selected_on"]["held_out_images"]
    ]
    images = torch.stack(
        [evaluate.data.TestSet(samples, SIZE)[i]["image"] for i in range(len(samples))]
    )
    refit = calibration.calibrate(model, features, lambda: [images], torch.device("cpu"))
    assert refit["image"] == pytest.approx(record["image"], rel=1e-5)
    assert refit["map_scale"]["scale"] == pytest.approx(record["map_scale"]["scale"], rel=1e-5)
    test_samples = realnet_data.open_recorded_dataset(None, "auto", best["dataset"], "test").test(
        "washer"
    )
    test_images = torch.stack(
        [evaluate.data.TestSet(test_samples, SIZE)[i]["image"] for i in range(2)]
    )
    other = calibration.calibrate(model, features, lambda: [test_images], torch.device("cpu"))
    assert other["image"] != pytest.approx(record["image"], rel=1e-3)
    # evaluate.py in another precision than the calibration's: refused, never silent
    line = one_line_error(
        run(
            "evaluate.py",
            "--checkpoint",
            os.path.join(out, "best.pt"),
            "--workers",
            "0",
            "--precision",
            "bf16",
            check=False,
        )
    )
    assert "fitted in fp32" in line and "recalibrate" in line

    run(
        "evaluate.py",
        "--checkpoint",
        os.path.join(out, "best.pt"),
        "--workers",
        "0",
        "--throughput-repeats",
        "1",
    )
    report = json.load(open(os.path.join(out, "eval", "metrics.json")))
    assert report["protocol"]["anomaly_map"].startswith("fused")
    assert (
        "stored in the checkpoint"
        in report["categories"]["washer"]["picture_threshold"]["chosen_on"]
    )
    assert len(os.listdir(os.path.join(out, "eval", "panels", "washer"))) == 7
    # the diagnosis scores the reported map as evaluate.py does, and the paper's map beside it
    table = os.path.join(out, "stage_maps.json")
    run(
        os.path.join("benchmarks", "stage_maps.py"),
        "--checkpoint",
        os.path.join(out, "best.pt"),
        "--json",
        table,
    )
    maps = json.load(open(table))["maps"]["all"]
    assert set(maps) == {
        "discriminator",
        "discriminator log-odds",
        "rrs residuals",
        "level 1 energy",
        "level 2 energy",
        "fused",
    }
    for name in ("image_auroc", "pixel_auroc", "au_pro"):
        assert maps["fused"][name] == pytest.approx(report["categories"]["washer"][name], abs=1e-9)


def test_training_that_would_learn_nothing_is_refused_in_one_line(demo):
    out = str(demo["root"] / "learns_nothing")
    for flag, value in (
        ("--steps", "0"),
        ("--steps", "-5"),
        ("--lr", "nan"),
        ("--lr", "0"),
        ("--discriminator-lr-scale", "0"),
    ):
        line = one_line_error(
            run("train_realnet.py", *train_args(demo, out), flag, value, check=False)
        )
        assert flag in line and value in line
        assert not os.path.exists(os.path.join(out, "model.pt"))
    line = one_line_error(
        run(
            "train_realnet.py",
            *train_args(demo, out, "--lr", "1e8", "--save-every", "1"),
            check=False,
        )
    )
    assert "not finite" in line and "--lr" in line
    saved = torch.load(os.path.join(out, "state.pt"), weights_only=False)  # the last good step
    assert f"step {saved['step'] + 1}:" in line
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_one_step_model_and_unified_run(demo):
    out = str(demo["root"] / "unified")
    run(
        "train_realnet.py",
        *[a for a in train_args(demo, out, steps=1) if a not in ("--category", "washer")],
        "--categories",
        "tablet,washer",
    )
    model = torch.load(os.path.join(out, "model.pt"), weights_only=False)
    assert model["step"] == 1 and model["unified"] and model["categories"] == ["tablet", "washer"]
    result = run(
        "evaluate.py",
        "--checkpoint",
        os.path.join(out, "model.pt"),
        "--workers",
        "0",
        "--panels",
        "0",
        "--throughput-repeats",
        "1",
    )
    report = json.load(open(os.path.join(out, "eval", "metrics.json")))
    assert set(report["categories"]) == {"tablet", "washer"}
    assert report["mean"]["image_auroc"] == pytest.approx(
        (
            report["categories"]["tablet"]["image_auroc"]
            + report["categories"]["washer"]["image_auroc"]
        )
        / 2
    )
    assert "mean" in result.stdout


def test_resume_after_a_kill_gives_the_same_model(demo):
    reference = str(demo["root"] / "uninterrupted")
    run("train_realnet.py", *train_args(demo, reference, "--save-every", "2", steps=24))

    out = str(demo["root"] / "killed")
    command = [
        sys.executable,
        os.path.join(REPO, "train_realnet.py"),
        *map(str, train_args(demo, out, "--save-every", "2", steps=24)),
    ]
    process = subprocess.Popen(
        command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    log = os.path.join(out, "loss.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if os.path.isfile(log) and len(open(log).readlines()) >= 7:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(os.path.join(out, "state.pt"), weights_only=False)["step"]
    assert 0 < killed_at < 24

    result = run(
        "train_realnet.py", *train_args(demo, out, "--save-every", "2", "--resume", steps=24)
    )
    assert "done: 24 steps" in result.stdout
    a, b = (
        state_dict(os.path.join(reference, "model.pt")),
        state_dict(os.path.join(out, "model.pt")),
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the loss log holds each step once, with the values of the uninterrupted run
    assert [e["loss"] for e in read_jsonl(log)] == [
        e["loss"] for e in read_jsonl(os.path.join(reference, "loss.jsonl"))
    ]


def test_two_ddp_processes_train_the_same_model_as_one(demo):
    single = str(demo["root"] / "single")
    run("train_realnet.py", *train_args(demo, single, steps=3))
    ddp = str(demo["root"] / "ddp")
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    result = run("train_realnet.py", *train_args(demo, ddp, steps=3), launcher=launcher)
    assert "2 process(es)" in result.stdout
    la, lb = (
        read_jsonl(os.path.join(single, "loss.jsonl")),
        read_jsonl(os.path.join(ddp, "loss.jsonl")),
    )
    assert [e["loss"] for e in la] == pytest.approx([e["loss"] for e in lb], rel=1e-5)
    # the same function: the same outputs on the same features. The parameters themselves are
    # compared through the outputs: in the first steps some gradients are at rounding-noise
    # level (the zero-initialised output convs block them; a bias before a per-channel
    # GroupNorm has gradient 0 in exact arithmetic), and Adam turns noise into steps of size
    # lr that differ from run to run. tests/test_model.py compares the gradients themselves.
    from realnet.model import RealNet

    models = []
    for folder in (single, ddp):
        ckpt = torch.load(os.path.join(folder, "model.pt"), weights_only=False)
        model = RealNet(ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
        models.append(model.eval())
    a, b = models[0].state_dict(), models[1].state_dict()
    # statistics of the global batch in both. (Not the discriminator BatchNorm's running mean:
    # it absorbs the bias of the conv before it, one of the noise-driven parameters above; its
    # effect cancels in the normalisation, which the output comparison below covers.)
    for key in ("rrs.running_mean", "rrs.running_var", "discriminator.decoder1.1.running_var"):
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(3, 8, 16, 16, generator=g), torch.randn(3, 16, 8, 8, generator=g)]
    with torch.no_grad():
        out_a, out_b = models[0](features, (SIZE, SIZE)), models[1](features, (SIZE, SIZE))
    assert torch.allclose(out_a["anomaly_map"], out_b["anomaly_map"], atol=1e-4)
    for ra, rb in zip(out_a["reconstructions"], out_b["reconstructions"]):
        assert torch.allclose(ra, rb, atol=1e-4)


# ----------------------------------------------------------------------------------------
# Bad inputs: one line, exit code 2
# ----------------------------------------------------------------------------------------


def test_afs_for_another_category_size_or_backbone_is_refused(demo):
    root = demo["root"]
    out = str(root / "refused")
    other = write_afs(str(root / "afs_tablet.pt"), category="tablet", backbone=demo["identity"])
    line = one_line_error(
        run("train_realnet.py", *train_args(demo, out, "--afs", other), check=False)
    )
    assert "afs_tablet.pt" in line and "'tablet'" in line
    line = one_line_error(
        run("train_realnet.py", *train_args(demo, out, "--input-size", "128"), check=False)
    )
    assert "input size 64" in line
    imagenet = write_afs(
        str(root / "afs_imagenet.pt"),
        backbone={"arch": "wide_resnet50_2", "weights": "imagenet", "digest": "0123456789abcdef"},
    )
    line = one_line_error(
        run(
            "train_realnet.py",
            *train_args(demo, out, "--afs", imagenet, "--backbone-weights", "random"),
            check=False,
        )
    )
    assert "afs_imagenet.pt" in line and "backbone" in line
    line = one_line_error(
        run(
            "train_realnet.py",
            *train_args(demo, out, "--afs", str(root / "missing.pt")),
            check=False,
        )
    )
    assert "missing.pt" in line


def test_the_afs_file_supplies_the_data_set_anomaly_source_and_input_size(demo):
    """Stage 4 takes what stage 3 decided from the AFS file; a flag that does not fit it is
    refused."""
    afs = write_afs(
        str(demo["root"] / "afs_recorded.pt"),
        backbone=demo["identity"],
        dataset={"root": os.path.abspath(demo["data"]), "format": "mvtec"},
        anomaly_source={
            "sdas_dir": None,
            "dtd_dir": os.path.abspath(demo["dtd"]),
            "foreground": "category",
            "min_paste_contrast": 1.5,
        },
    )
    out = str(demo["root"] / "from_afs")
    run(
        "train_realnet.py",
        "--afs",
        afs,
        "--width-ratio",
        "0.5",
        "--batch-size",
        "4",
        "--steps",
        "1",
        "--workers",
        "0",
        "--out",
        out,
    )
    args = json.load(open(os.path.join(out, "args.json")))
    assert os.path.samefile(args["data"], demo["data"]) and os.path.samefile(
        args["dtd"], demo["dtd"]
    )
    assert args["input_size"] == SIZE and args["foreground"] == "category" and args["sdas"] is None
    assert args["min_paste_contrast"] == 1.5  # training draws its anomalies as AFS did
    model = torch.load(os.path.join(out, "model.pt"), weights_only=False)
    assert model["categories"] == ["washer"] and model["config"]["input_size"] == SIZE
    line = one_line_error(
        run(
            "train_realnet.py",
            "--afs",
            afs,
            "--category",
            "tablet",
            "--out",
            out + "_2",
            check=False,
        )
    )
    assert "afs_recorded.pt" in line and "'washer'" in line


def test_resume_with_another_configuration_is_refused(demo):
    out = str(demo["root"] / "reconfigured")
    run("train_realnet.py", *train_args(demo, out, steps=1))
    line = one_line_error(
        run("train_realnet.py", *train_args(demo, out, "--arch", "C", "--resume"), check=False)
    )
    assert "another model configuration" in line and "arch" in line
    line = one_line_error(
        run(
            "train_realnet.py",
            *train_args(demo, out, "--batch-size", "2", "--resume"),
            check=False,
        )
    )
    assert "other training settings" in line and "--batch-size: 4 there, 2 now" in line
    line = one_line_error(run("train_realnet.py", *train_args(demo, out), check=False))
    assert "--resume" in line  # never overwrite a training state silently


def test_evaluate_refuses_foreign_files_and_another_backbone(demo):
    out = str(demo["root"] / "for_eval")
    run("train_realnet.py", *train_args(demo, out, steps=1))
    line = one_line_error(run("evaluate.py", "--checkpoint", demo["afs"], check=False))
    assert "expected a realnet checkpoint" in line
    ckpt = torch.load(os.path.join(out, "model.pt"), weights_only=False)
    ckpt["config"]["backbone"] = {
        "arch": "wide_resnet50_2",
        "weights": "imagenet",
        "digest": "0123456789abcdef",
    }
    torch.save(ckpt, os.path.join(out, "other_backbone.pt"))
    line = one_line_error(
        run(
            "evaluate.py",
            "--checkpoint",
            os.path.join(out, "other_backbone.pt"),
            "--backbone-weights",
            "random",
            check=False,
        )
    )
    assert "0123456789abcdef" in line and "--backbone-weights" in line


def test_a_test_split_without_anomalies_reports_what_it_can(demo):
    out = str(demo["root"] / "no_anomalies")
    run("train_realnet.py", *train_args(demo, out, steps=1))
    only_good = demo["root"] / "only_good"
    shutil.copytree(os.path.join(demo["data"], "washer", "train"), only_good / "washer" / "train")
    shutil.copytree(
        os.path.join(demo["data"], "washer", "test", "good"),
        only_good / "washer" / "test" / "good",
    )
    result = run(
        "evaluate.py",
        "--checkpoint",
        os.path.join(out, "model.pt"),
        "--data",
        str(only_good),
        "--workers",
        "0",
        "--panels",
        "0",
        "--throughput-repeats",
        "1",
    )
    assert "pixel metrics need" in result.stdout and "masks" in result.stdout
    report = json.load(open(os.path.join(out, "eval", "metrics.json")))
    washer = report["categories"]["washer"]
    assert (
        washer["image_auroc"] is None
        and washer["pixel_auroc"] is None
        and washer["au_pro"] is None
    )
    assert "needs good and anomalous images" in washer["not_computed"]["image_auroc"]
    assert "masks" in washer["not_computed"]["au_pro"]
    with open(os.path.join(out, "eval", "scores.csv")) as f:
        assert len(list(csv.DictReader(f))) == 3  # the scores are still written


# ----------------------------------------------------------------------------------------
# Nothing lost, nothing silent (issue 14)
# ----------------------------------------------------------------------------------------


def snapshot(folder):
    """Every file under `folder` with its bytes."""
    return {
        os.path.relpath(os.path.join(parent, name), folder): open(
            os.path.join(parent, name), "rb"
        ).read()
        for parent, _, names in os.walk(folder)
        for name in names
    }


def refused(stage, argv, *fragments):
    """In this process (no interpreter start): a UserError, i.e. one line and exit 2 under
    cli.run."""
    with pytest.raises(UserError) as error:
        stage.main([str(a) for a in argv])
    message = str(error.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


RESUME_DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", RESUME_DEVICES)
def test_resume_restores_every_tensor_on_the_models_device(demo, tmp_path, device):
    """Without a GPU, 'meta' stands in for CUDA: the same code path, the same placement."""
    from realnet.backbone import Backbone
    from realnet.distributed import DistInfo
    from realnet.files import load_checkpoint
    from realnet.model import build_config
    from realnet import checkpoint

    config = build_config(
        load_checkpoint(demo["afs"], "--afs", kind="afs"), strides=Backbone.strides
    )
    run_settings, out = {"training": {"--lr": 1e-3}}, str(tmp_path)
    args = argparse.Namespace(
        precision="fp32", seed=0, lr=1e-3, discriminator_lr_scale=1.0, resume=False
    )
    cpu = DistInfo()
    model, _, optimizer, scaler, _, best = train_realnet.build_model(
        config, args, run_settings, out, cpu
    )
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    checkpoint.save_run(out, model, optimizer, scaler, run_settings, 1, best, {})
    target = DistInfo(device=torch.device(device))
    args.resume = True
    model, ddp_model, optimizer, _, step, _ = train_realnet.build_model(
        config, args, run_settings, out, target
    )
    assert step == 1 and ddp_model is model and runs.misplaced_tensors(model, optimizer) == []
    moments = [v for entry in optimizer.state.values() for v in entry.values() if v.dim() > 0]
    assert len(moments) == 2 * len(list(model.parameters()))
    assert all(v.device.type == device for v in moments + list(model.state_dict().values()))


def test_bad_training_flags_are_refused_before_any_file(demo, tmp_path):
    out = tmp_path / "run"
    refused(
        train_realnet,
        train_args(demo, out, "--k-max", "1000"),
        "--k-max 1000",
        "each must be in [0, 24]",
    )
    assert not out.exists()
    (tmp_path / "a_file").write_text("mine")
    refused(
        train_realnet,
        train_args(demo, tmp_path / "a_file"),
        "--out",
        "a_file' is a file, expected a folder",
    )
    assert (tmp_path / "a_file").read_text() == "mine"
    small = write_afs(str(tmp_path / "afs60.pt"), input_size=60, backbone=demo["identity"])
    refused(
        train_realnet,
        [a if a != demo["afs"] else small for a in train_args(demo, out)],
        "--input-size 60",
        "multiple of 16",
    )
    assert not out.exists()


def test_a_failed_evaluation_keeps_the_previous_report_and_flags_are_never_ignored(demo, tmp_path):
    out = str(tmp_path / "run")
    train_realnet.main([str(a) for a in train_args(demo, out, steps=1)])
    checkpoint = os.path.join(out, "model.pt")
    orphan = os.path.join(out, ".model.pt.k3j_x9q2.tmp")  # what a kill during a save leaves
    open(orphan, "wb").close()
    train_realnet.main([str(a) for a in train_args(demo, out, "--resume", steps=2)])
    assert not os.path.exists(orphan)

    fast = [
        "--checkpoint",
        checkpoint,
        "--workers",
        "0",
        "--panels",
        "0",
        "--throughput-repeats",
        "1",
    ]
    evaluate.main(fast)
    eval_dir = os.path.join(out, "eval")
    before = snapshot(eval_dir)
    assert {"args.json", "metrics.json", "scores.csv"} <= set(before)

    no_mask = tmp_path / "no_mask"
    shutil.copytree(os.path.join(demo["data"], "washer"), no_mask / "washer")
    os.unlink(no_mask / "washer" / "ground_truth" / "chip" / "000_mask.png")
    refused(evaluate, fast + ["--data", no_mask], "has no mask")
    refused(evaluate, fast + ["--pool", "0"], "--pool 0", "1 to 64")
    refused(evaluate, fast + ["--pool", "1000"], "--pool 1000", "1 to 64")
    refused(evaluate, fast + ["--format", "mvtec"], "--format mvtec has no effect without --data")
    refused(
        evaluate,
        fast + ["--pixel-threshold", "0.5"],
        "--pixel-threshold 0.5 has no effect without --predict",
    )
    refused(
        evaluate,
        fast + ["--image-threshold", "0.5"],
        "--image-threshold 0.5 has no effect without --predict",
    )
    refused(
        evaluate, fast + ["--out", checkpoint], "--out", "model.pt' is a file, expected a folder"
    )
    assert snapshot(eval_dir) == before

    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    shutil.copy(
        os.path.join(demo["data"], "washer", "test", "good", "000.png"), unlabeled / "a.png"
    )
    evaluate.main(fast + ["--predict", str(unlabeled)])  # a lot: never into eval/
    assert snapshot(eval_dir) == before  # args.json still describes metrics.json
    lots = [name for name in os.listdir(os.path.join(out, "predict")) if not name.startswith(".")]
    assert len(lots) == 1
    with open(os.path.join(out, "predict", lots[0], "lot.json")) as f:
        assert json.load(f)["settings"]["predict"] == str(unlabeled)

    ckpt = torch.load(checkpoint, weights_only=True)
    name = next(iter(ckpt["state_dict"]))
    ckpt["state_dict"][name] = torch.full_like(ckpt["state_dict"][name], float("nan"))
    torch.save(ckpt, os.path.join(out, "diverged.pt"))
    line = one_line_error(
        run(
            "evaluate.py",
            "--checkpoint",
            os.path.join(out, "diverged.pt"),
            "--workers",
            "0",
            check=False,
        )
    )
    assert "not finite" in line and name in line and "--lr" in line
