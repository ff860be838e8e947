"""realnet/anomalies.py: the paper's blend (eq. 3) and the anomaly sources (SDAS images, DTD
textures, their mix)."""

import numpy as np
import pytest

from realnet import anomalies
from realnet.cli import UserError
from tiny_data import SIZE


def test_blend_is_the_paper_formula():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    source = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = (rng.random((16, 16)) < 0.4).astype(np.float32)
    out = anomalies.blend(image, source, mask, 0.7)
    expected = np.rint(0.7 * source.astype(float) + (1 - 0.7) * image.astype(float))
    assert out.dtype == np.uint8
    assert (out[mask == 0] == image[mask == 0]).all()
    assert (out[mask == 1] == expected[mask == 1]).all()
    assert (anomalies.blend(image, source, mask, 1.0)[mask == 1] == source[mask == 1]).all()


def test_anomaly_source_errors(tmp_path):
    with pytest.raises(UserError, match="no anomaly source"):
        anomalies.AnomalySource(64)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match="--sdas: folder .* has no images"):
        anomalies.AnomalySource(64, sdas_dir=str(tmp_path / "empty"))
    with pytest.raises(UserError, match="--dtd: folder .* has no images"):
        anomalies.AnomalySource(64, dtd_dir=str(tmp_path / "empty"))
    with pytest.raises(UserError, match="does not exist"):
        anomalies.AnomalySource(64, dtd_dir=str(tmp_path / "missing"))


def test_sources_deltas_and_the_mix(anomaly_sources):
    source = anomalies.AnomalySource(
        SIZE, sdas_dir=anomaly_sources["sdas"], dtd_dir=anomaly_sources["dtd"]
    )
    assert len(source.sdas) == 3 and len(source.dtd) == 10  # the manifest is not an image
    rng = np.random.default_rng(0)
    draws = [source.draw(rng) for _ in range(200)]
    kinds = [d[2] for d in draws]
    assert 70 < kinds.count("sdas") < 130  # about half each
    assert all(0.5 <= d[1] <= 1.0 for d in draws if d[2] == "sdas")
    assert all(0.2 <= d[1] <= 1.0 for d in draws if d[2] == "dtd")
    assert min(d[1] for d in draws if d[2] == "dtd") < 0.5  # the DTD range reaches below 0.5
    assert all(d[0].shape == (SIZE, SIZE, 3) and d[0].dtype == np.uint8 for d in draws)


def test_paste_contrast_measures_change_against_the_local_grain():
    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32), np.float32)
    mask[8:24, 8:24] = 1
    flat = np.full((32, 32, 3), 100, np.uint8)
    grain = np.clip(100 + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
    assert anomalies.paste_contrast(grain, grain, mask) == 0.0  # nothing changed
    assert anomalies.paste_contrast(grain, grain, np.zeros_like(mask)) == 0.0  # no mask
    brighter = lambda image: np.clip(image.astype(int) + 10, 0, 255).astype(np.uint8)  # noqa: E731
    # the same 10-grey-level change: plain on a flat surface, lost in a grain of 30
    on_flat = anomalies.paste_contrast(
        flat, anomalies.blend(flat, brighter(flat), mask, 1.0), mask
    )
    on_grain = anomalies.paste_contrast(
        grain, anomalies.blend(grain, brighter(grain), mask, 1.0), mask
    )
    assert on_flat == pytest.approx(10.0)  # the spread is floored at one grey level
    assert 0.2 < on_grain < 0.6
    # the change scales with delta (eq. 3): half the delta, about half the contrast
    source = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    full = anomalies.paste_contrast(grain, anomalies.blend(grain, source, mask, 1.0), mask)
    half = anomalies.paste_contrast(grain, anomalies.blend(grain, source, mask, 0.5), mask)
    assert half == pytest.approx(full / 2, rel=0.05)


def test_source_images_decoded_once_are_the_same_draws(anomaly_sources, monkeypatch):
    dirs = dict(sdas_dir=anomaly_sources["sdas"], dtd_dir=anomaly_sources["dtd"])
    cached = anomalies.AnomalySource(SIZE, **dirs)
    draws = [cached.draw(np.random.default_rng(seed)) for seed in range(60)]
    assert len(cached._images) == 13  # every source decoded once, then reused
    assert all(not image.flags.writeable for image in cached._images.values())
    monkeypatch.setattr(anomalies, "SOURCE_CACHE_BYTES", 2 * SIZE * SIZE * 3)
    bounded = anomalies.AnomalySource(SIZE, **dirs)
    again = [bounded.draw(np.random.default_rng(seed)) for seed in range(60)]
    assert len(bounded._images) == 2  # the budget holds two images; the rest decoded each time
    for a, b in zip(draws, again):
        assert (a[0] == b[0]).all() and a[1:] == b[1:]


def test_min_contrast_redraws_faint_pastes_and_zero_keeps_the_paper(anomaly_sources):
    from realnet import data

    image = data.load_image(
        data.open_dataset(anomaly_sources["data"]).train("washer")[0].image, SIZE
    )
    kwargs = dict(dtd_dir=anomaly_sources["dtd"], foreground="none")
    paper = anomalies.AnomalySynthesizer("washer", "mvtec", SIZE, **kwargs)
    firm = anomalies.AnomalySynthesizer("washer", "mvtec", SIZE, **kwargs, min_contrast=2.0)
    assert firm.describe()["min_paste_contrast"] == 2.0
    first, kept = [], []
    for seed in range(40):
        a = paper.synthesize(image, np.random.default_rng(seed))
        b = firm.synthesize(image, np.random.default_rng(seed))
        # the mask is drawn before the appearance, so a redraw keeps it
        assert (a["mask"] == b["mask"]).all()
        assert a["contrast"] == pytest.approx(
            anomalies.paste_contrast(image, a["anomalous"], a["mask"])
        )
        if a["contrast"] >= 2.0:  # visible at the first draw: the same anomaly
            assert (a["anomalous"] == b["anomalous"]).all() and a["delta"] == b["delta"]
        first.append(a["contrast"])
        kept.append(b["contrast"])
    faint = [i for i, c in enumerate(first) if c < 2.0]
    assert faint, "no faint first draw: the test would check nothing"
    assert all(kept[i] >= 2.0 or kept[i] >= first[i] for i in faint)
    assert np.mean([kept[i] >= 2.0 for i in faint]) > 0.8  # redrawn until visible
    # the first draw of min_contrast=0 is the single draw the paper's synthesis makes
    rng = np.random.default_rng(3)
    paper.draw_mask(np.ones((SIZE, SIZE), np.float32), rng)
    texture, delta, _, _ = paper.source.draw(rng)
    again = paper.synthesize(image, np.random.default_rng(3))
    assert again["delta"] == delta
