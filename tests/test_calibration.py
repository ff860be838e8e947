"""realnet/calibration.py: the fused map's scale, the OK/NG thresholds fitted on good images,
calibration files and how evaluate.py resolves which calibration it decides with."""

import json

import numpy as np
import pytest
import torch

from realnet import calibration as C
from realnet.cli import UserError
from test_invariance import SIZE, tiny_model


# ----------------------------------------------------------------------------------------
# The map scale and the thresholds, as plain numbers
# ----------------------------------------------------------------------------------------


def test_a_tail_heavy_part_does_not_outweigh_the_others():
    rng = np.random.default_rng(0)
    energy = rng.gamma(2.0, 1.0, 20000)  # spread of order 1
    near_constant = rng.normal(0, 1e-3, 20000)  # a saturated probability, say
    near_constant[:150] = rng.uniform(0.5, 1.0, 150)  # fires on 0.75 % of normal pixels
    scale = C.fit_map_scale(np.stack([near_constant, energy]), ["disc", "energy"])
    # std-standardised, the firing pixels would sit at ~10 sigma; by the 99th percentile the
    # firing part's scale is set by its own normal tail, so its normal pixels stay in range
    z = (near_constant - scale["centre"][0]) / scale["scale"][0]
    assert np.quantile(z, 0.99) == pytest.approx(1.0, abs=1e-6)
    z_energy = (energy - scale["centre"][1]) / scale["scale"][1]
    assert np.quantile(z_energy, 0.99) == pytest.approx(1.0, abs=1e-6)
    assert scale["weight"] == [1.0, 1.0] and scale["notes"] == []


def test_a_part_constant_on_good_images_is_dropped_with_a_note():
    rng = np.random.default_rng(1)
    parts = np.stack(
        [np.full(5000, 3.0), rng.normal(5, 1, 5000), 5.0 + rng.normal(0, 1e-9, 5000)]
    )  # constant up to a relative 1e-10
    scale = C.fit_map_scale(parts, ["a", "b", "c"])
    assert scale["weight"] == [0.0, 1.0, 0.0]
    assert len(scale["notes"]) == 2 and "'a' is constant" in scale["notes"][0]
    with pytest.raises(UserError, match="every part of the fused map is constant"):
        C.fit_map_scale(np.stack([np.zeros(100), np.ones(100)]), ["a", "b"])


def test_the_normal_rule_sits_as_far_again_above_the_highest_good_score():
    scores = np.array([1.0, 1.2, 1.1, 3.0], np.float32)
    # from a typical pixel at 0.5 up to the highest good score (3.0), and as much again
    margin = C.MARGIN_IMAGES / (len(scores) + 1)  # shrinks as good images are added
    assert C.normal_threshold(scores, 0.5) == pytest.approx(3.0 + margin * 2.5)
    assert C.normal_margin(4) == pytest.approx(0.6) and C.normal_margin(20) < 0.15
    assert C.normal_threshold(scores, 0.5, margin=0) == pytest.approx(3.0)
    assert C.normal_threshold(scores, 5.0) == pytest.approx(3.0)  # never below the highest
    assert C.image_threshold("normal", scores, 0.5) == C.normal_threshold(scores, 0.5)


def test_fpr_threshold_calls_at_most_the_target_share_of_normal_values_ng():
    values = np.arange(100, dtype=np.float32) / 100
    for target, allowed in ((0.05, 5), (0.0, 0), (0.019, 1), (0.5, 50)):
        t = C.fpr_threshold(values, target)
        assert (values >= t).sum() == allowed, target
    tied = np.array([0.1, 0.2, 0.9, 0.9, 0.9], dtype=np.float32)  # a tied run: all or none
    assert (tied >= C.fpr_threshold(tied, 0.4)).sum() == 0
    assert (tied >= C.fpr_threshold(tied, 0.6)).sum() == 3


def test_f1_needs_synthetic_anomalies_and_separates_them():
    normal, anomalous = np.array([0.1, 0.2, 0.3]), np.array([0.8, 0.9])
    t = C.image_threshold("f1", normal, anomalous_scores=anomalous)
    assert 0.3 < t <= 0.8
    with pytest.raises(UserError, match="f1 needs images with synthetic anomalies"):
        C.image_threshold("f1", normal)


def test_balanced_accuracy_on_the_test_split_and_the_best_any_threshold_reaches():
    record = {"image": 0.5, "rule": "normal", "set_by": "calibration"}
    scores = np.array([0.1, 0.6, 0.2, 0.7, 0.4], dtype=np.float32)
    labels = np.array([0, 0, 0, 1, 1], dtype=bool)
    result = C.on_test_set(record, scores, labels)
    assert result["image_fpr"] == pytest.approx(1 / 3) and result["image_recall"] == 0.5
    assert result["balanced_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    # t = 0.4: recall 1, FPR 1/3 -> 0.833; t = 0.7: recall 0.5, FPR 0 -> 0.75
    assert result["best_balanced_accuracy"] == pytest.approx(5 / 6)
    assert "not_computed" in C.on_test_set(record, scores, np.zeros(5, bool))


# ----------------------------------------------------------------------------------------
# Calibrating a model
# ----------------------------------------------------------------------------------------


def tiny(anomaly_map="fused"):
    """tests/test_invariance.py's tiny model (random backbone, random weights: non-zero
    reconstructions, so energies that differ)."""
    return tiny_model(anomaly_map)


def good_images(n, seed=0):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("anomaly_map", ["fused", "discriminator"])
def test_calibrate_fits_on_each_good_image_once_and_records_how(anomaly_map):
    model, features = tiny(anomaly_map)
    images = good_images(5)
    seen = []

    def batches():
        for i in range(0, 5, 2):
            seen.append(len(images[i : i + 2]))
            yield images[i : i + 2]

    record = C.calibrate(model, features, batches, torch.device("cpu"), pool=4, source="test")
    assert record["good_images"] == 5 and sum(seen) == 5 * (2 if model.fused else 1)
    assert record["precision"] == "fp32" and record["rule"] == "normal"
    assert record["weights_digest"] == C.weights_digest(model.state_dict())
    assert record["image"] == record["pixel"] == record["fitted"]["image"]
    assert record["on_good_images"]["image_fpr"] == 0.0  # above every good image
    assert any("rests on 5 good image(s)" in note for note in record["notes"])
    json.dumps(record)  # plain types: a weights_only checkpoint can hold it
    with torch.no_grad():
        maps = model(features(images), (SIZE, SIZE))["anomaly_map"].numpy()
    from realnet.metrics import image_scores

    assert image_scores(maps, pool=4).max() < record["image"]
    if model.fused:  # the model now scores with the fitted scale
        assert model.map_centre.tolist() == pytest.approx(record["map_scale"]["centre"])
        assert record["map_scale"]["parts"] == model.part_names()
    else:
        assert record["map_scale"] is None


def test_the_weights_digest_leaves_out_only_what_calibration_sets():
    model, _ = tiny()
    state = model.state_dict()
    digest = C.weights_digest(state)
    changed = {k: v.clone() for k, v in state.items()}
    changed["map_scale"] += 1
    assert C.weights_digest(changed) == digest  # a recalibration: the same weights
    changed["rrs.running_var"] += 1e-3
    assert C.weights_digest(changed) != digest


def record_for(digest, fused=True):
    return {
        "kind": C.KIND,
        "version": 1,
        "weights_digest": digest,
        "rule": "normal",
        "image": 2.0,
        "pixel": 2.0,
        "fitted": {"image": 2.0, "pixel": 2.0},
        "set_by": "calibration",
        "image_score": "avgpool",
        "pool": 16,
        "precision": "fp32",
        "map_scale": {"centre": [0, 0], "scale": [1, 1], "weight": [1, 1]} if fused else None,
        "good_images": 30,
        "notes": [],
    }


def test_calibration_files_of_other_weights_or_foreign_files_are_refused(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(record_for("aaaa")))
    assert C.read_file(str(path), "aaaa", fused=True)["set_by"] == "calibration"
    with pytest.raises(UserError, match="other weights.*aaaa.*bbbb"):
        C.read_file(str(path), "bbbb", fused=True)
    (tmp_path / "args.json").write_text(json.dumps({"lr": 1e-3}))
    with pytest.raises(UserError, match="not a calibration file"):
        C.read_file(str(tmp_path / "args.json"), "aaaa", fused=False)
    with pytest.raises(UserError, match="does not exist"):
        C.read_file(str(tmp_path / "missing.json"), "aaaa", fused=False)
    path.write_text(json.dumps(record_for("aaaa", fused=False)))
    with pytest.raises(UserError, match="no map scale"):
        C.read_file(str(path), "aaaa", fused=True)
    # edited by hand: recorded as such, not as the fitted rule
    path.write_text(json.dumps(record_for("aaaa") | {"image": 5.0}))
    assert C.read_file(str(path), "aaaa", fused=True)["set_by"] == "hand"


def test_resolve_takes_the_file_then_the_stored_one_and_refuses_what_would_mislead(tmp_path):
    stored = record_for("d")
    args = dict(digest="d", fused=True, image_score="avgpool", pool=16, run_precision="fp32")
    assert C.resolve(None, None, None, None, **(args | {"fused": False})) is None
    used = C.resolve(stored, None, None, None, **args)
    assert used["image"] == 2.0 and used["used_from"] == "stored in the checkpoint"
    # a hand-set threshold replaces one of the two and says so
    used = C.resolve(stored, None, None, 0.7, **args)
    assert used["pixel"] == 0.7 and used["image"] == 2.0 and used["set_by"] == "hand"
    assert "--pixel-threshold" in used["used_from"]
    alone = C.resolve(None, None, 3.0, None, **(args | {"fused": False}))
    assert alone["image"] == 3.0 and alone["pixel"] is None and alone["set_by"] == "hand"
    assert C.describe(alone) == "OK/NG: image score >= 3 is NG; mask: map >= none (set by hand)"
    path = tmp_path / "c.json"
    path.write_text(json.dumps(stored | {"image": 9.0, "fitted": stored["fitted"]}))
    assert C.resolve(stored, str(path), None, None, **args)["image"] == 9.0
    with pytest.raises(UserError, match="fitted in fp32.*recalibrate in bf16"):
        C.resolve(stored, None, None, None, **(args | {"run_precision": "bf16"}))
    with pytest.raises(UserError, match="pool 16"):
        C.resolve(stored, None, None, None, **(args | {"pool": 8}))
    with pytest.raises(UserError, match="fused map is not calibrated"):
        C.resolve(None, None, None, None, **args)
