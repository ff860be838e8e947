"""realnet/validation.py: the held-out validation's verdict on whether a run learnt anything."""

import json

import numpy as np
import torch

from realnet import validation


def write_log(folder, entries):
    with open(folder / validation.VAL_LOG, "w") as f:
        for entry in entries:
            f.write(json.dumps(entry) + "\n")


def test_a_run_whose_held_out_validation_ends_near_chance_is_told_so(tmp_path):
    assert validation.learning_check(str(tmp_path)) is None  # no validation: nothing to say
    write_log(tmp_path, [{"step": 100, "pixel_auroc": 0.95}, {"step": 200, "pixel_auroc": 0.55}])
    check = validation.learning_check(str(tmp_path))
    assert check["step"] == 200 and check["held_out_pixel_auroc"] == 0.55
    assert "did not learn" in check["warning"] and "learning_curve.png" in check["warning"]
    assert "contact_sheet" in check["warning"]
    # the last validation counts: a run that learnt late is fine
    write_log(tmp_path, [{"step": 100, "pixel_auroc": 0.5}, {"step": 200, "pixel_auroc": 0.93}])
    assert validation.learning_check(str(tmp_path))["warning"] is None


def test_a_split_that_holds_out_or_leaves_one_image_says_so():
    said = []
    train, held = validation.split_validation(list(range(10)), 0.1, 0, log=said.append)
    assert len(held) == 1 and len(train) == 9 and "holds out 1 of 10" in said[0]
    said.clear()
    train, held = validation.split_validation(list(range(4)), 0.75, 0, log=said.append)
    assert len(train) == 1 and any("leaves 1 of 4" in line for line in said)
    said.clear()
    validation.split_validation(list(range(40)), 0.1, 0, log=said.append)
    assert said == []  # the demo's split: 4 of 40, nothing to say


class FakeStream:
    """Sample g is image g % n (an epoch order), anomalous on odd g, its pixels saying g."""

    def __init__(self, n_images):
        self.n_images = n_images

    def __getitem__(self, g):
        return {
            "image": torch.full((3, 4, 4), float(g)),
            "mask": torch.full((1, 4, 4), float(g % 2)),
            "anomalous": bool(g % 2),
            "index": g % self.n_images,
        }

    def clean_image(self, index):
        return np.full((4, 4, 3), index, dtype=np.uint8)


def test_few_held_out_images_still_give_enough_validation_samples():
    # the demo: 4 held-out images; 2 samples each would leave 4 anomalies to judge a run on
    val = validation.make_validation_set(FakeStream(4), 4)
    assert len(val["image"]) == validation.MIN_VALIDATION_SAMPLES >= 32
    assert int(val["anomalous"].sum()) == validation.MIN_VALIDATION_SAMPLES // 2
    assert val["distinct"] == 4 and len(val["normal"]) == 4  # calibration: each image once
    assert torch.equal(val["image"][:, 0, 0, 0], torch.arange(32.0))  # the stream's first 32
    # many held-out images: 2 samples each, more than asked for
    val = validation.make_validation_set(FakeStream(40), 40, n_samples=16)
    assert len(val["image"]) == 80 and val["distinct"] == 40
