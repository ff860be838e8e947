"""realnet/visibility.py and select_features.py --min-source-visibility (issue 28): a source
whose pasted anomalies look like the normal images is measured as invisible and dropped,
a visible one is kept, and never both are dropped."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from realnet import data, visibility
from test_select_features import _run
from tiny_data import write_image

SIZE = 64


class PooledColour(torch.nn.Module):
    """A stand-in backbone: one 'layer', the image's colour average-pooled to stride 4."""

    def forward(self, x):
        return [F.avg_pool2d(x, 4)]


def _smooth_grey(rng):
    return np.clip(120 + rng.normal(0, 4, (SIZE, SIZE, 1)) + np.zeros((1, 1, 3)), 0, 255).astype(
        np.uint8
    )


def test_invisible_sources_drops_the_low_one_never_both():
    assert visibility.invisible_sources({"sdas": [0.42, 0.46], "dtd": [0.74, 0.65]}, 0.55) == [
        "sdas"
    ]
    assert (
        visibility.invisible_sources({"sdas": [0.42, 0.70], "dtd": [0.74, 0.65]}, 0.55) == []
    )  # one layer sees it
    assert (
        visibility.invisible_sources({"sdas": [0.5, 0.5], "dtd": [0.52, 0.4]}, 0.55) == []
    )  # all low: keep all
    assert visibility.invisible_sources({"dtd": [0.3]}, 0.55) == []


def test_source_visibility_tells_normal_looking_pastes_from_visible_ones(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(_smooth_grey(rng)).save(
            write_image(str(tmp_path / "d" / "c" / "train" / "good" / f"{i:03d}.png"))
        )
    write_image(str(tmp_path / "d" / "c" / "test" / "good" / "000.png"))
    for i in range(4):  # 'SDAS' images that are just more normal images; DTD: saturated colours
        Image.fromarray(_smooth_grey(rng)).save(
            write_image(str(tmp_path / "sdas" / f"{i:03d}.png"))
        )
        colour = np.zeros((SIZE, SIZE, 3), np.uint8) + np.array(
            [[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]][i]], np.uint8
        )
        Image.fromarray(colour).save(
            write_image(str(tmp_path / "dtd" / "images" / "t" / f"{i:03d}.png"))
        )
    ds = data.open_dataset(str(tmp_path / "d"))
    scores = visibility.source_visibility(
        PooledColour(),
        ds.train("c"),
        "c",
        ds.format,
        SIZE,
        str(tmp_path / "sdas"),
        str(tmp_path / "dtd"),
        "none",
        0,
        torch.device("cpu"),
        n_anomalies=8,
    )
    assert set(scores) == {"sdas", "dtd"}
    assert scores["dtd"][0] > 0.9, scores
    assert scores["sdas"][0] < 0.6, scores
    assert visibility.invisible_sources(scores, 0.6) == ["sdas"]


def test_select_features_records_and_drops_an_invisible_source(
    demo, monkeypatch, tmp_path, capsys
):  # noqa: F811
    for i in range(3):
        write_image(str(tmp_path / "sdas" / f"{i:03d}.png"), size=(64, 64), seed=i)
    seen = {}

    def fake(
        backbone,
        train,
        category,
        dataset_format,
        size,
        sdas,
        dtd,
        foreground,
        seed,
        device,
        min_contrast,
    ):
        seen.update(sdas=sdas, dtd=dtd, category=category, min_contrast=min_contrast)
        return {"sdas": [0.45, 0.5], "dtd": [0.8, 0.7]}

    monkeypatch.setattr(visibility, "source_visibility", fake)
    afs = _run(
        ["--sdas", str(tmp_path / "sdas"), "--min-source-visibility", "0.55"],
        demo,
        str(tmp_path / "run"),
    )
    assert seen["category"] == "washer" and seen["sdas"] and seen["dtd"]
    assert afs["source_visibility"]["dropped"] == ["sdas"]
    assert afs["anomaly_source"]["sdas_dir"] is None and afs["anomaly_source"]["dtd_images"] > 0
    assert "use dtd alone" in capsys.readouterr().out
    plain = _run(
        ["--sdas", str(tmp_path / "sdas")], demo, str(tmp_path / "plain")
    )  # off: the paper
    assert plain["source_visibility"] is None and plain["anomaly_source"]["sdas_dir"]
