"""Using a trained model: the calibration train_realnet.py stores (--val-fraction),
evaluate.py --predict on a trained model (score, decision, mask, map, CSV) and its
one-line errors; benchmarks/stage_maps.py on the same model. The tiny demo data set
and helpers of tests/test_train_eval.py. The streaming lot itself (its folder, memory,
interruptions, unreadable files) is tested below on an untrained model with a threshold
(tests/deploy_model.py): no training needed. --export: tests/test_export.py."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from deploy_model import scores_and_maps, write_checkpoint
from realnet import calibration, metrics, predict as lots
from realnet.predict import CSV_COLUMNS
from stages import ENV, REPO, one_line_error, run, train_args
from tiny_data import SIZE
from tiny_data import write_image


@pytest.fixture(scope="module")
def trained(demo):
    """A model trained with held-out images (so calibrated) and one without."""
    out = str(demo["root"] / "with_threshold")
    held_out = [
        "--val-fraction",
        "0.25",
        "--val-every",
        "5",
        "--threshold-rule",
        "fpr",
        "--target-fpr",
        "0.5",
    ]
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
    chip.convert("RGB").resize((80, 50)).save(folder / "chip.jpg")  # another size and format
    return {
        "model": os.path.join(out, "model.pt"),
        "plain": os.path.join(plain, "model.pt"),
        "folder": str(folder),
        "root": demo["root"],
    }


def evaluate(checkpoint, out, *extra, check=True, out_flag=True):
    return run(
        "evaluate.py",
        "--checkpoint",
        checkpoint,
        "--workers",
        "0",
        *(("--out", out) if out_flag else ()),
        "--throughput-repeats",
        "1",
        *extra,
        check=check,
    )


def predict(trained, checkpoint, out, *extra, check=True):
    return evaluate(checkpoint, out, "--predict", trained["folder"], *extra, check=check)


def test_the_checkpoint_stores_how_it_was_calibrated(trained):
    ckpt = torch.load(trained["model"], weights_only=False)
    record = ckpt["calibration"]
    assert record["rule"] == "fpr" and record["target_fpr"] == 0.5
    assert record["good_images"] == 2 and record["precision"] == "fp32"
    assert record["on_good_images"]["image_fpr"] <= 0.5
    assert "never the test set" in record["source"]
    json.dumps(record)  # plain numbers and strings only
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
        if size == (SIZE, SIZE):  # at the model's size the mask is the thresholded map itself
            expected = anomaly_map >= np.float32(stored["pixel"])
            assert ((np.asarray(mask) == 255) == expected).all()
        assert os.path.isfile(os.path.join(out, row["picture"]))
    assert sorted(os.listdir(os.path.join(out, "pictures"))) == ["chip.jpg.jpg", "good.png.jpg"]

    # the same calibration file, edited: everything NG, recorded as set by hand
    edited = os.path.join(str(trained["root"]), "edited.json")
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
    line = one_line_error(
        predict(trained, trained["plain"], out, "--calibration", chosen, check=False)
    )
    assert "--calibration" in line and "other weights" in line
    empty = trained["root"] / "empty"
    os.makedirs(empty, exist_ok=True)
    line = one_line_error(
        predict(trained | {"folder": str(empty)}, trained["model"], out, check=False)
    )
    assert "--predict" in line and "no images" in line
    line = one_line_error(
        predict(trained, trained["model"], out, "--image-score", "max", check=False)
    )
    assert "--image-score max" in line
    line = one_line_error(
        predict(trained, trained["model"], out, "--categories", "washer", check=False)
    )
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
    rows = read_rows(out, "scores.csv")  # the OK/NG column: the calibrated image threshold
    assert len(rows) == washer["images"]
    for row in rows:
        ng = np.float32(float(row["score"])) >= np.float32(stored["image"])
        assert row["decision"] == ("NG" if ng else "OK")
    labels = np.array([row["label"] == "1" for row in rows])
    called = np.array([row["decision"] == "NG" for row in rows])
    assert on_test["balanced_accuracy"] == pytest.approx(
        (called[labels].mean() + 1 - called[~labels].mean()) / 2
    )
    out = str(trained["root"] / "evaluated_plain")
    evaluate(trained["plain"], out, "--panels", "1")
    washer = json.load(open(os.path.join(out, "metrics.json")))["categories"]["washer"]
    assert "FOR THE PICTURES ONLY" in washer["picture_threshold"]["chosen_on"]
    assert "calibration_on_test" not in washer
    assert {row["decision"] for row in read_rows(out, "scores.csv")} == {""}  # no threshold


def test_stage_maps_scores_the_discriminator_exactly_as_evaluate_does(trained):
    evaluated = str(trained["root"] / "evaluated_for_stage_maps")
    evaluate(trained["model"], evaluated, "--panels", "0")
    reported = json.load(open(os.path.join(evaluated, "metrics.json")))["categories"]["washer"]
    table = str(trained["root"] / "stage_maps.json")
    result = run(
        "benchmarks/stage_maps.py",
        "--checkpoint",
        trained["model"],
        "--json",
        table,
        "--batch-size",
        "3",
    )
    maps = json.load(open(table))["maps"]
    assert set(maps) == {"all", *reported["per_defect"]}
    levels = len(torch.load(trained["model"], weights_only=False)["config"]["levels"])
    assert set(maps["all"]) == {
        "discriminator",
        "discriminator log-odds",
        "rrs residuals",
        *(f"level {n} energy" for n in range(1, levels + 1)),
    }
    # another batch size, the same numbers: to 1e-5, as float32 sums in another order (batch
    # size, thread count) move a per-defect AU-PRO by ~1e-6 (seen: 1.3e-6 with 1 thread)
    for metric in ("image_auroc", "pixel_auroc", "au_pro"):
        assert maps["all"]["discriminator"][metric] == pytest.approx(reported[metric], abs=1e-5)
        for defect, numbers in reported["per_defect"].items():
            assert maps[defect]["discriminator"][metric] == pytest.approx(
                numbers[metric], abs=1e-5
            )
    assert all(0 <= v <= 1 for row in maps.values() for m in row.values() for v in m.values())
    assert "level 1 energy" in result.stdout
    line = one_line_error(
        run(
            "benchmarks/stage_maps.py",
            "--checkpoint",
            trained["model"],
            "--batch-size",
            "0",
            check=False,
        )
    )
    assert "--batch-size must be >= 1" in line


# ----------------------------------------------------------------------------------------
# The streaming lot, on an untrained model with a threshold (no training needed)
# ----------------------------------------------------------------------------------------

LONG = "l" * 246 + ".png"  # 250 characters: maps/<it>.npy still fits in a file name
LONGER = "m" * 251 + ".png"  # 255: its outputs' names must be cut


@pytest.fixture(scope="module")
def lot(tmp_path_factory):
    root = tmp_path_factory.mktemp("lot")
    folder = root / "images"
    sizes = {
        "000.png": (SIZE, SIZE),
        "001.jpg": (90, 50),
        "002.png": (40, 70),
        "a.png": (SIZE + 1, SIZE - 3),
        "a_png.png": (33, 31),
        LONG: (SIZE, 48),
        LONGER: (50, SIZE),
    }
    paths = [
        write_image(str(folder / name), size=size, seed=i)
        for i, (name, size) in enumerate(sizes.items())
    ]
    (folder / "broken.png").write_bytes(b"not an image")  # unreadable: skipped, listed
    (folder / "notes.txt").write_text("not an image file name: not part of the lot")
    checkpoint = str(root / "run" / "model.pt")
    model, features = write_checkpoint(checkpoint, paths)
    return {
        "root": root,
        "folder": str(folder),
        "paths": paths,
        "sizes": sizes,
        "checkpoint": checkpoint,
        "model": model,
        "features": features,
    }


def predict_lot(lot, *extra, check=True):
    """evaluate.py --predict with the default --workers (2)."""
    return run(
        "evaluate.py",
        "--checkpoint",
        lot["checkpoint"],
        "--predict",
        lot["folder"],
        "--batch-size",
        "3",
        *extra,
        check=check,
    )


def read_rows(folder, name="predictions.csv"):
    with open(os.path.join(folder, name)) as f:
        return list(csv.DictReader(f))


def lots_in(lot):
    folder = os.path.join(os.path.dirname(lot["checkpoint"]), "predict")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_output_names_never_collide_and_fit_in_a_file_name():
    names = lots.output_names(
        [
            "d/a.png",
            "d/a_png.png",
            "d/a.jpg",
            "d/" + LONG,
            "d/" + LONGER,
            "d/" + "m" * 251 + ".jpg",
            "d/" + "é" * 130 + ".png",
        ]
    )
    assert len(set(names)) == len(names)
    assert names[:4] == ["a.png", "a_png.png", "a.jpg", LONG]
    for name in names:
        assert len((name + ".npy").encode()) <= 255 and len((name + ".png").encode()) <= 255
    assert names[4] != names[5] and "~" in names[4]  # cut, told apart by the hash


def test_a_lot_streams_into_its_own_folder_with_every_file(lot):
    result = predict_lot(lot)  # default --workers 2, an unreadable image among the images
    assert "Traceback" not in result.stderr
    assert "predict step" in result.stdout and "img/s" in result.stdout
    assert "left" in result.stdout and "images 8/8" in result.stdout
    assert "skipped 1 of 8 images" in result.stdout and "skipped.csv" in result.stdout
    (name,) = lots_in(lot)  # nothing else: no staging folder, no lock file left
    assert name.startswith("images-")
    out = os.path.join(os.path.dirname(lot["checkpoint"]), "predict", name)
    assert not os.path.exists(os.path.join(os.path.dirname(lot["checkpoint"]), "eval"))
    skipped = read_rows(out, "skipped.csv")
    assert [os.path.basename(r["file"]) for r in skipped] == ["broken.png"]
    assert "not a readable image" in skipped[0]["reason"]

    rows = read_rows(out)
    assert [os.path.basename(r["file"]) for r in rows] == sorted(lot["sizes"])
    scores, maps = scores_and_maps(lot["model"], lot["features"], [r["file"] for r in rows])
    image_threshold = np.float32(float(rows[0]["threshold"]))
    assert {r["decision"] for r in rows} == {"OK", "NG"}
    for row, score, expected_map in zip(rows, scores, maps):
        for column in ("map", "mask", "picture"):
            assert os.path.isfile(os.path.join(out, row[column])), row[column]
        anomaly_map = np.load(os.path.join(out, row["map"]))
        assert anomaly_map.shape == (SIZE, SIZE)  # the model's size; the mask the image's
        assert np.abs(anomaly_map - expected_map).max() <= 1e-5
        assert float(row["score"]) == pytest.approx(float(score), rel=1e-5)
        assert row["decision"] == ("NG" if score >= image_threshold else "OK")
        mask = Image.open(os.path.join(out, row["mask"]))
        assert mask.size == lot["sizes"][os.path.basename(row["file"])]
    assert len({r["map"] for r in rows}) == len(rows)  # a.png and a_png.png apart
    described = json.load(open(os.path.join(out, "lot.json")))
    assert described["counts"] == {
        "scored": 7,
        "skipped": 1,
        "NG": sum(r["decision"] == "NG" for r in rows),
        "OK": sum(r["decision"] == "OK" for r in rows),
    }
    assert os.path.isfile(os.path.join(out, "calibration.json"))
    assert not os.path.exists(os.path.join(out, "throughput.json"))  # only when asked


def test_lots_never_mix(lot, tmp_path):
    before = set(lots_in(lot))
    predict_lot(lot, "--workers", "0")  # a second lot: a folder of its own
    after = set(lots_in(lot))
    assert len(after - before) == 1 and before <= after
    finished = os.path.join(os.path.dirname(lot["checkpoint"]), "predict", sorted(after)[0])
    kept = open(os.path.join(finished, "predictions.csv")).read()
    line = one_line_error(predict_lot(lot, "--out", finished, check=False))
    assert "holds a finished lot" in line
    assert open(os.path.join(finished, "predictions.csv")).read() == kept
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("someone's file")
    line = one_line_error(predict_lot(lot, "--out", str(other), check=False))
    assert "is not empty" in line and os.listdir(other) == ["mine.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    predict_lot(
        lot, "--out", str(empty), "--workers", "0", "--throughput", "--throughput-repeats", "1"
    )
    assert json.load(open(empty / "throughput.json"))["images_per_s"] > 0
    assert sorted(os.listdir(tmp_path)) == ["empty", "other"]  # no staging, no lock left


def test_stop_on_unreadable_stops_at_the_first_one_with_one_line(lot, tmp_path):
    out = tmp_path / "stopped"
    line = one_line_error(predict_lot(lot, "--out", str(out), "--stop-on-unreadable", check=False))
    assert "broken.png" in line and "--stop-on-unreadable" in line
    assert os.listdir(tmp_path) == []  # no lot, no staging folder, no lock file


def test_predict_of_a_file_says_it_is_a_file(lot):
    line = one_line_error(
        run(
            "evaluate.py",
            "--checkpoint",
            lot["checkpoint"],
            "--predict",
            lot["paths"][0],
            check=False,
        )
    )
    assert "is a file, expected a folder" in line


INTERRUPTED = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import evaluate
from realnet import predict
write, done = predict.write_image_outputs, []
def interrupted(*args, **kwargs):
    row = write(*args, **kwargs)
    done.append(row)
    if len(done) == 4:   # in the middle of the lot's writing
        {action}
    return row
predict.write_image_outputs = interrupted
evaluate.cli.run(lambda: evaluate.main({argv!r}))
"""


def interrupt(lot, out, action):
    argv = [
        "--checkpoint",
        lot["checkpoint"],
        "--predict",
        lot["folder"],
        "--out",
        out,
        "--batch-size",
        "3",
    ]
    code = INTERRUPTED.format(repo=REPO, action=action, argv=argv)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_an_interrupted_lot_leaves_nothing_that_looks_finished(lot, tmp_path):
    out = str(tmp_path / "lot")
    result = interrupt(lot, out, "raise KeyboardInterrupt")  # Ctrl-C while writing
    assert result.returncode == 130 and "interrupted" in result.stderr
    assert os.listdir(tmp_path) == []  # the run removed what it had staged

    result = interrupt(lot, out, "os.kill(os.getpid(), signal.SIGKILL)")  # no clean-up
    assert result.returncode == -9
    assert not os.path.exists(out)  # nothing that looks finished
    assert os.path.isdir(out + ".partial") and os.listdir(out + ".partial/maps")

    result = predict_lot(lot, "--out", out)  # the rerun: the stale staging folder goes
    assert "unfinished lot of an interrupted run" in result.stdout
    assert len(read_rows(out)) == 7 and len(os.listdir(os.path.join(out, "maps"))) == 7
    assert sorted(os.listdir(tmp_path)) == ["lot"]


def test_a_second_run_into_a_lot_being_written_is_refused(lot, tmp_path):
    out = str(tmp_path / "busy")
    first = lots.Lot(out)
    assert first.claim(log=lambda line: None)  # a run writing this lot (this process)
    try:
        with open(first.path("predictions.csv"), "w") as f:
            f.write("the first run's rows\n")
        line = one_line_error(predict_lot(lot, "--out", out, check=False))
        assert f"another predict run (pid {os.getpid()})" in line
        assert open(first.path("predictions.csv")).read() == "the first run's rows\n"
    finally:
        first.abandon()
    assert os.listdir(tmp_path) == []


MEMORY = """
import os, resource, shutil, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, os.path.join({repo!r}, "tests"))
import torch
from deploy_model import write_checkpoint
from realnet import predict
root, image = {root!r}, {image!r}
model, features = write_checkpoint(os.path.join(root, "model.pt"))
threshold = {{"image": 0.5, "pixel": 0.5, "used_from": "a test"}}
for n in (16, 600):
    folder = os.path.join(root, f"lot{{n}}")
    os.makedirs(folder)
    for i in range(n):
        shutil.copy(image, os.path.join(folder, f"{{i:04d}}.png"))
    predict.predict_lot(model, features, folder, torch.device("cpu"), threshold,
                        out=folder + "_out", checkpoint=os.path.join(root, "model.pt"),
                        batch_size=8, workers=0, log=lambda line: None)
    print("peak_mib", n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def test_memory_stays_flat_as_the_lot_grows(lot, tmp_path):
    """The peak memory of one process after a lot of 16 images, then after one of 600: a
    predict that kept each image's map (16 KiB at 64 px) would add 9 MiB, its input
    tensor 28 MiB more; streaming adds nothing but noise."""
    code = MEMORY.format(repo=REPO, root=str(tmp_path), image=lot["paths"][1])
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    peaks = dict(
        line.split()[1:] for line in result.stdout.splitlines() if line.startswith("peak_mib")
    )
    small, large = float(peaks["16"]), float(peaks["600"])
    assert large - small < 4, (small, large)
    assert len(read_rows(str(tmp_path / "lot600_out"))) == 600
