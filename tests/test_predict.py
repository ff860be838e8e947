"""Using a trained model: the calibration train_realnet.py stores (--val-fraction),
evaluate.py --predict (score, decision, mask, map, CSV), --export, and their one-line
errors; benchmarks/stage_maps.py on the same model. The tiny demo data set and helpers of
tests/test_train_eval.py."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from realnet import calibration, metrics, ops
from realnet.predict import CSV_COLUMNS
from test_train_eval import SIZE, demo, one_line_error, run, train_args  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def trained(demo):
    """A model trained with held-out images (so calibrated) and one without."""
    out = str(demo["root"] / "with_threshold")
    held_out = ["--val-fraction", "0.25", "--val-every", "5", "--threshold-rule", "fpr",
                "--target-fpr", "0.5"]
    result = run("train_realnet.py", *train_args(demo, out, *held_out, steps=10))
    assert "model.pt: OK/NG: image score >=" in result.stdout and "rule fpr 0.5" in result.stdout
    plain = str(demo["root"] / "without_threshold")
    result = run("train_realnet.py", *train_args(demo, plain, steps=1))
    assert "not calibrated" in result.stdout
    folder = demo["root"] / "to_predict"
    os.makedirs(folder)
    test_images = os.path.join(demo["data"], "washer", "test")
    shutil.copy(os.path.join(test_images, "good", "000.png"), folder / "good.png")
    chip = Image.open(os.path.join(test_images, "chip", "000.png"))
    chip.convert("RGB").resize((80, 50)).save(folder / "chip.jpg")   # another size and format
    return {"model": os.path.join(out, "model.pt"), "plain": os.path.join(plain, "model.pt"),
            "folder": str(folder), "root": demo["root"]}


def evaluate(checkpoint, out, *extra, check=True):
    return run("evaluate.py", "--checkpoint", checkpoint, "--workers", "0", "--out", out,
               "--throughput-repeats", "1", *extra, check=check)


def predict(trained, checkpoint, out, *extra, check=True):
    return evaluate(checkpoint, out, "--predict", trained["folder"], *extra, check=check)


def test_the_checkpoint_stores_how_it_was_calibrated(trained):
    ckpt = torch.load(trained["model"], weights_only=False)
    record = ckpt["calibration"]
    assert record["rule"] == "fpr" and record["target_fpr"] == 0.5
    assert record["good_images"] == 2 and record["precision"] == "fp32"
    assert record["on_good_images"]["image_fpr"] <= 0.5
    assert "never the test set" in record["source"]
    json.dumps(record)   # plain numbers and strings only
    best_path = os.path.join(os.path.dirname(trained["model"]), "best.pt")
    best = torch.load(best_path, weights_only=False)
    # best.pt: the calibration of its own weights
    assert best["calibration"]["weights_digest"] == calibration.weights_digest(best["state_dict"])
    assert best["calibration"]["weights_digest"] != record["weights_digest"]
    assert torch.load(trained["plain"], weights_only=False)["calibration"] is None


def test_predict_writes_score_decision_mask_map_and_csv(trained):
    out = str(trained["root"] / "predicted")
    result = predict(trained, trained["model"], out)
    assert "scored 2 images" in result.stdout
    with open(os.path.join(out, "predictions.csv")) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = {os.path.basename(r["file"]): r for r in reader}
    assert set(rows) == {"chip.jpg", "good.png"}
    threshold = json.load(open(os.path.join(out, "calibration.json")))
    stored = torch.load(trained["model"], weights_only=False)["calibration"]
    assert threshold["image"] == stored["image"] and threshold["pixel"] == stored["pixel"]
    for name, size in (("chip.jpg", (80, 50)), ("good.png", (SIZE, SIZE))):
        row = rows[name]
        anomaly_map = np.load(os.path.join(out, row["map"]))
        assert anomaly_map.shape == (SIZE, SIZE) and anomaly_map.dtype == np.float32
        score = float(metrics.image_scores(anomaly_map[None])[0])
        assert float(row["score"]) == pytest.approx(score, rel=1e-6)
        ng = np.float32(score) >= np.float32(stored["image"])
        assert row["decision"] == ("NG" if ng else "OK")
        assert float(row["threshold"]) == pytest.approx(stored["image"], rel=1e-7)
        mask = Image.open(os.path.join(out, row["mask"]))
        assert mask.size == size and mask.mode == "L"
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        if size == (SIZE, SIZE):   # at the model's size the mask is the thresholded map itself
            expected = anomaly_map >= np.float32(stored["pixel"])
            assert ((np.asarray(mask) == 255) == expected).all()
    assert sorted(os.listdir(os.path.join(out, "predict"))) == ["chip.png", "good.png"]

    # the same calibration file, edited: everything NG, recorded as set by hand
    edited = os.path.join(out, "edited.json")
    with open(edited, "w") as f:
        json.dump(threshold | {"image": -1e9}, f)
    predict(trained, trained["model"], out + "_edited", "--calibration", edited)
    with open(os.path.join(out + "_edited", "predictions.csv")) as f:
        assert {r["decision"] for r in csv.DictReader(f)} == {"NG"}
    assert json.load(open(os.path.join(out + "_edited", "calibration.json")))["set_by"] == "hand"
    # --image-threshold: the verdict by hand, the calibrated pixel threshold kept
    predict(trained, trained["model"], out + "_hand", "--image-threshold", "1e9")
    with open(os.path.join(out + "_hand", "predictions.csv")) as f:
        assert {r["decision"] for r in csv.DictReader(f)} == {"OK"}
    used = json.load(open(os.path.join(out + "_hand", "calibration.json")))
    assert used["set_by"] == "hand" and used["pixel"] == stored["pixel"]


def test_without_a_threshold_predict_says_so_and_writes_scores_and_maps(trained):
    out = str(trained["root"] / "predicted_plain")
    result = predict(trained, trained["plain"], out)
    assert "no threshold" in result.stdout and "--val-fraction" in result.stdout
    with open(os.path.join(out, "predictions.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["decision"] for r in rows] == ["", ""] and [r["mask"] for r in rows] == ["", ""]
    assert all(os.path.isfile(os.path.join(out, r["map"])) for r in rows)
    assert not os.path.exists(os.path.join(out, "masks"))
    assert not os.path.exists(os.path.join(out, "calibration.json"))


def test_bad_predict_inputs_get_one_line(trained):
    out = str(trained["root"] / "refused")
    chosen = str(trained["root"] / "predicted" / "calibration.json")
    line = one_line_error(predict(trained, trained["plain"], out, "--calibration", chosen,
                                  check=False))
    assert "--calibration" in line and "other weights" in line
    empty = trained["root"] / "empty"
    os.makedirs(empty, exist_ok=True)
    line = one_line_error(predict(trained | {"folder": str(empty)}, trained["model"], out,
                                  check=False))
    assert "--predict" in line and "no images" in line
    line = one_line_error(predict(trained, trained["model"], out, "--image-score", "max",
                                  check=False))
    assert "--image-score max" in line
    line = one_line_error(predict(trained, trained["model"], out, "--categories", "washer",
                                  check=False))
    assert "--categories washer has no effect with --predict" in line


def test_evaluation_pictures_use_the_stored_threshold_and_report_it_on_the_test_set(trained):
    out = str(trained["root"] / "evaluated")
    evaluate(trained["model"], out, "--panels", "1")
    washer = json.load(open(os.path.join(out, "metrics.json")))["categories"]["washer"]
    stored = torch.load(trained["model"], weights_only=False)["calibration"]
    assert washer["picture_threshold"]["value"] == stored["pixel"]
    assert "calibrated" in washer["picture_threshold"]["note"]
    on_test = washer["calibration_on_test"]
    assert on_test["image"] == stored["image"] and 0 <= on_test["balanced_accuracy"] <= 1
    out = str(trained["root"] / "evaluated_plain")
    evaluate(trained["plain"], out, "--panels", "1")
    washer = json.load(open(os.path.join(out, "metrics.json")))["categories"]["washer"]
    assert "FOR THE PICTURES ONLY" in washer["picture_threshold"]["chosen_on"]
    assert "calibration_on_test" not in washer


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="needs the compiled extension")
def test_export_writes_a_program_equal_to_the_eager_model(trained):
    out = str(trained["root"] / "exported")
    path = os.path.join(out, "model.pt2")
    result = evaluate(trained["model"], out, "--export", path, "--batch-size", "4")
    assert "max abs difference" in result.stdout and os.path.isfile(path)
    report = json.load(open(os.path.join(out, "export.json")))
    assert report["max_abs_difference"] == {"batch of 4": 0.0, "batch of 1": 0.0}
    assert "rrs_gather" in report["fused_ops_in_graph"]


def test_stage_maps_scores_the_discriminator_exactly_as_evaluate_does(trained):
    evaluated = str(trained["root"] / "evaluated_for_stage_maps")
    evaluate(trained["model"], evaluated, "--panels", "0")
    reported = json.load(open(os.path.join(evaluated, "metrics.json")))["categories"]["washer"]
    table = str(trained["root"] / "stage_maps.json")
    result = run("benchmarks/stage_maps.py", "--checkpoint", trained["model"], "--json", table,
                 "--batch-size", "3")
    maps = json.load(open(table))["maps"]
    assert set(maps) == {"all", *reported["per_defect"]}
    levels = len(torch.load(trained["model"], weights_only=False)["config"]["levels"])
    assert set(maps["all"]) == {"discriminator", "discriminator log-odds", "rrs residuals",
                                *(f"level {n} energy" for n in range(1, levels + 1))}
    for metric in ("image_auroc", "pixel_auroc", "au_pro"):   # another batch size, the same numbers
        assert maps["all"]["discriminator"][metric] == pytest.approx(reported[metric], abs=1e-6)
        for defect, numbers in reported["per_defect"].items():
            assert maps[defect]["discriminator"][metric] == pytest.approx(numbers[metric], abs=1e-6)
    assert all(0 <= v <= 1 for row in maps.values() for m in row.values() for v in m.values())
    assert "level 1 energy" in result.stdout
    line = one_line_error(run("benchmarks/stage_maps.py", "--checkpoint", trained["model"],
                              "--batch-size", "0", check=False))
    assert "--batch-size must be >= 1" in line


def test_recalibration_on_good_images_writes_a_new_file_tied_to_the_weights(trained):
    good = trained["root"] / "more_good"
    os.makedirs(good)
    test_good = os.path.join(torch.load(trained["model"], weights_only=False)["dataset"]["root"],
                              "washer", "test", "good")
    for name in sorted(os.listdir(test_good)):   # good images the model was not trained on
        shutil.copy(os.path.join(test_good, name), good / name)
    out = str(trained["root"] / "recalibrated.json")
    result = run("-m", "realnet.calibration", "--checkpoint", trained["model"], "--good", str(good),
                 "--out", out)
    assert "rests on 3 good image(s)" in result.stdout
    record = json.load(open(out))
    assert record["good_images"] == 3 and record["source"].startswith("--good")
    stored = torch.load(trained["model"], weights_only=False)["calibration"]
    assert record["weights_digest"] == stored["weights_digest"]   # the same weights
    # never over an earlier calibration
    line = one_line_error(run("-m", "realnet.calibration", "--checkpoint", trained["model"],
                              "--good", str(good), "--out", out, check=False))
    assert "exists" in line and "never replaced" in line
    # evaluate.py decides with it
    predicted = str(trained["root"] / "predicted_recalibrated")
    predict(trained, trained["model"], predicted, "--calibration", out)
    used = json.load(open(os.path.join(predicted, "calibration.json")))
    assert used["image"] == record["image"] and used["used_from"] == f"--calibration {out}"
    # for another checkpoint's weights: refused
    line = one_line_error(predict(trained, trained["plain"], predicted + "_x", "--calibration",
                                  out, check=False))
    assert "other weights" in line
