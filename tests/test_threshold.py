"""realnet/threshold.py: the OK/NG threshold chosen without labels, and threshold files."""
import io
import json

import numpy as np
import pytest
import torch

from realnet import threshold as T
from realnet.cli import UserError


def test_fpr_threshold_calls_at_most_the_target_share_of_normal_values_ng():
    values = np.arange(100, dtype=np.float32) / 100
    for target, allowed in ((0.05, 5), (0.0, 0), (0.019, 1), (0.5, 50)):
        t = T.fpr_threshold(values, target)
        assert (values >= t).sum() == allowed, target
    # ties never push the rate above the target: a tied run is all OK or all NG
    tied = np.array([0.1, 0.2, 0.9, 0.9, 0.9], dtype=np.float32)
    assert (tied >= T.fpr_threshold(tied, 0.4)).sum() == 0
    assert (tied >= T.fpr_threshold(tied, 0.6)).sum() == 3


def maps_and_masks(n_normal=6, n_anomalous=6, size=32, seed=0):
    """Normal maps low everywhere; anomalous maps high on a square (their mask)."""
    rng = np.random.default_rng(seed)
    maps = rng.uniform(0, 0.3, (n_normal + n_anomalous, size, size)).astype(np.float32)
    masks = np.zeros_like(maps)
    masks[n_normal:, 8:24, 8:24] = 1
    maps[n_normal:, 8:24, 8:24] += 0.5
    return maps, masks


def test_f1_rule_separates_the_held_out_images_and_pixels():
    maps, masks = maps_and_masks()
    chosen = T.choose(maps, masks, "f1", pool=4)
    assert chosen["on_held_out"] == {"image_fpr": 0.0, "image_recall": 1.0, "image_f1": 1.0,
                                     "pixel_fpr_on_normal_images": 0.0}
    assert chosen["held_out_images"] == {"normal": 6, "anomalous": 6}
    assert chosen["target_fpr"] is None
    assert chosen["image_score"] == "avgpool" and chosen["pool"] == 4
    assert ((maps >= chosen["pixel"]) == (masks > 0)).all()
    json.dumps(chosen)   # plain numbers and strings: a weights_only checkpoint can hold it
    buffer = io.BytesIO()
    torch.save({"threshold": chosen}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["threshold"] == chosen


def test_fpr_rule_needs_only_normal_images_and_keeps_their_rate():
    maps, masks = maps_and_masks(n_normal=20, n_anomalous=0)
    chosen = T.choose(maps, masks, "fpr", target_fpr=0.1, pool=4)
    assert chosen["on_held_out"]["image_fpr"] <= 0.1 and chosen["target_fpr"] == 0.1
    assert chosen["on_held_out"]["pixel_fpr_on_normal_images"] <= 0.1
    assert chosen["on_held_out"]["image_recall"] is None
    assert T.choose(maps, masks, "f1") is None   # F1 needs anomalies


def test_weights_digest_names_the_weights():
    state = {"a": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3), "h": torch.ones(2).half()}
    copy = {k: v.clone() for k, v in state.items()}
    assert T.weights_digest(state) == T.weights_digest(copy)
    copy["a"][1, 2] += 1e-3
    assert T.weights_digest(state) != T.weights_digest(copy)


def test_threshold_files_of_another_model_or_foreign_files_are_refused(tmp_path):
    chosen = T.choose(*maps_and_masks(), "f1", pool=4)
    path = tmp_path / "threshold.json"
    path.write_text(json.dumps(T.to_file(chosen, "aaaa", "run/model.pt")))
    assert T.read_file(str(path), "aaaa")["image"] == chosen["image"]
    with pytest.raises(UserError, match="another model.*aaaa.*bbbb"):
        T.read_file(str(path), "bbbb")
    (tmp_path / "args.json").write_text(json.dumps({"lr": 1e-3}))
    with pytest.raises(UserError, match="not a threshold file"):
        T.read_file(str(tmp_path / "args.json"), "aaaa")
    with pytest.raises(UserError, match="does not exist"):
        T.read_file(str(tmp_path / "missing.json"), "aaaa")


def test_resolve_takes_the_file_then_the_stored_one_and_checks_the_image_score(tmp_path):
    stored = T.choose(*maps_and_masks(), "f1", pool=4)
    assert T.resolve(None, None, None, "d", "avgpool", 4) is None
    used = T.resolve(stored, None, None, "d", "avgpool", 4)
    assert used["image"] == stored["image"] and used["source"] == "stored in the checkpoint"
    # --threshold T replaces the pixel threshold only
    used = T.resolve(stored, None, 0.7, "d", "avgpool", 4)
    assert used["pixel"] == 0.7 and used["image"] == stored["image"]
    assert "--threshold" in used["source"]
    assert T.resolve(None, None, 0.7, "d", "avgpool", 4) == {"image": None, "pixel": 0.7,
                                                             "source": "--threshold"}
    edited = T.to_file(stored, "d", "model.pt") | {"image": 0.99}
    path = tmp_path / "threshold.json"
    path.write_text(json.dumps(edited))
    assert T.resolve(stored, str(path), None, "d", "avgpool", 4)["image"] == 0.99
    with pytest.raises(UserError, match="--image-score max"):
        T.resolve(stored, None, None, "d", "max", 4)
    with pytest.raises(UserError, match="pool 4"):
        T.resolve(stored, None, None, "d", "avgpool", 16)


def test_on_test_set_reports_the_rates_of_the_stored_threshold():
    stored = {"image": 0.5, "rule": "f1", "image_score": "avgpool", "pool": 16, "chosen_on": "x"}
    scores = np.array([0.1, 0.6, 0.2, 0.7, 0.4], dtype=np.float32)
    labels = np.array([0, 0, 0, 1, 1], dtype=bool)
    result = T.on_test_set(stored, scores, labels, "avgpool", 16)
    assert result["image_fpr"] == pytest.approx(1 / 3) and result["image_recall"] == 0.5
    assert result["accuracy"] == pytest.approx(3 / 5) and result["image_f1"] == pytest.approx(0.5)
    assert "not_computed" in T.on_test_set(stored, scores, labels, "max", 16)
