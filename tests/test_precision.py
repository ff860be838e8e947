"""--precision: bf16 autocast on the CPU gives anomaly maps close to fp32's, trains, and
resumes only in the precision it started in; fp16 is refused on the CPU in one line."""

import csv
import json
import os

import pytest
import torch

from realnet import data, metrics, precision
from realnet.cli import UserError
from realnet.inference import anomaly_maps, load_model
from stages import one_line_error, run, train_args

# bf16 keeps 8 significant bits: each product is within 2^-9 (0.2 %) of fp32's, and the
# errors grow along the backbone's ~20 convolutions to about 0.7 % of a feature (measured).
# The map is a probability in [0, 1] behind a softmax of the discriminator's logits: where
# the model is sure (most pixels) it hardly moves; where a logit is near 0 (map near 0.5) a
# small shift moves it most, and RRS may pick another channel there. So: a small mean,
# a bound on the 99th percentile, a looser one on the worst pixel, and image scores (means
# of 16 x 16 windows) that move little.
MAP_MEAN_ABS = 0.005
MAP_Q99_ABS = 0.05
MAP_MAX_ABS = 0.15
SCORE_MAX_ABS = 0.02


@pytest.fixture(scope="module")
def trained(demo):  # noqa: F811
    out = str(demo["root"] / "precision_fp32")
    run("train_realnet.py", *train_args(demo, out, steps=20))
    return os.path.join(out, "model.pt")


def test_bf16_maps_are_close_to_fp32_on_the_cpu(demo, trained):  # noqa: F811
    model, features, _ = load_model(trained, None, torch.device("cpu"))
    test = data.TestSet(data.open_dataset(demo["data"]).test("washer"), model.config["input_size"])
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    maps = {}
    for name in ("fp32", "bf16"):
        with precision.autocast(name, torch.device("cpu")):
            maps[name] = anomaly_maps(model, features, images).float()
    assert maps["fp32"].dtype == maps["bf16"].dtype == torch.float32
    difference = (maps["bf16"] - maps["fp32"]).abs()
    assert difference.mean() < MAP_MEAN_ABS, difference.mean()
    assert difference.flatten().quantile(0.99) < MAP_Q99_ABS, difference.flatten().quantile(0.99)
    assert difference.max() < MAP_MAX_ABS, difference.max()
    assert difference.max() > 0  # bf16 did run: the maps are not bit-identical
    scores = {k: metrics.score_images(m.numpy(), "avgpool", 16) for k, m in maps.items()}
    assert abs(scores["bf16"] - scores["fp32"]).max() < SCORE_MAX_ABS, scores


def test_bf16_training_runs_records_its_precision_and_resumes_only_in_it(demo):  # noqa: F811
    out = str(demo["root"] / "precision_bf16")
    run("train_realnet.py", *train_args(demo, out, "--precision", "bf16", steps=4))
    with open(os.path.join(out, "loss.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 4 and all(loss == loss and loss < 1e3 for loss in losses)
    with open(os.path.join(out, "args.json")) as f:
        assert json.load(f)["precision"] == "bf16"
    line = one_line_error(
        run("train_realnet.py", *train_args(demo, out, "--resume", steps=6), check=False)
    )
    assert "precision" in line and "bf16" in line and "fp32" in line, line


def test_fp16_is_refused_on_the_cpu_in_one_line(demo):  # noqa: F811
    out = str(demo["root"] / "precision_fp16")
    line = one_line_error(
        run(
            "train_realnet.py",
            *train_args(demo, out, "--precision", "fp16", "--device", "cpu"),
            check=False,
        )
    )
    assert "--precision fp16" in line and "CUDA" in line
    assert not os.path.exists(out)  # refused before anything was written
    with pytest.raises(UserError, match="--precision fp16"):
        precision.check_precision("fp16", torch.device("cpu"))
    precision.check_precision("bf16", torch.device("cpu"))  # accepted


def test_evaluate_in_bf16_reports_scores_close_to_fp32(demo, trained):  # noqa: F811
    scores = {}
    for name in ("fp32", "bf16"):
        out = str(demo["root"] / f"eval_{name}")
        run(
            "evaluate.py",
            "--checkpoint",
            trained,
            "--precision",
            name,
            "--workers",
            "0",
            "--panels",
            "0",
            "--throughput-repeats",
            "1",
            "--out",
            out,
        )
        with open(os.path.join(out, "scores.csv")) as f:
            scores[name] = [float(row["score"]) for row in csv.DictReader(f)]
        with open(os.path.join(out, "metrics.json")) as f:
            report = json.load(f)
        assert report["args"]["precision"] == name
        assert report["throughput"]["autocast"] == (None if name == "fp32" else "torch.bfloat16")
    assert len(scores["fp32"]) == len(scores["bf16"]) == 7
    assert max(abs(a - b) for a, b in zip(scores["fp32"], scores["bf16"])) < SCORE_MAX_ABS
    for extra in (
        ["--precision", "fp16", "--device", "cpu"],
        ["--precision", "bf16", "--export", str(demo["root"] / "m.pt2")],
    ):
        line = one_line_error(
            run(
                "evaluate.py",
                "--checkpoint",
                trained,
                *extra,
                "--out",
                str(demo["root"] / "eval_refused"),
                check=False,
            )
        )
        assert "--precision" in line, line
    assert not os.path.exists(demo["root"] / "eval_refused")
