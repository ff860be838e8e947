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
