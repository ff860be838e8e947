"""realnet/stream.py: the training stream (half of every batch normal, epochs, seeds and
rank splits, DataLoader workers, example dumps)."""

import os

import numpy as np
import pytest
import torch

from realnet import anomalies, data, stream
from realnet.cli import UserError
from tiny_data import SIZE


def _stream(anomaly_sources, ratio=0.5, seed=0):
    ds = data.open_dataset(anomaly_sources["data"])
    synth = anomalies.AnomalySynthesizer(
        "washer", ds.format, SIZE, sdas_dir=anomaly_sources["sdas"], dtd_dir=anomaly_sources["dtd"]
    )
    return stream.AnomalyStream(
        ds.train("washer"), SIZE, {"washer": synth}, seed=seed, normal_ratio=ratio
    )


def test_stream_half_of_every_batch_is_normal(anomaly_sources):
    samples = _stream(anomaly_sources)
    batch = 6
    for step in range(3):
        items = [samples[g] for g in stream.StreamSampler(step, step + 1, batch)]
        normal = [it for it in items if not it["anomalous"]]
        assert len(normal) == batch // 2
        for it in normal:
            assert it["mask"].sum() == 0 and torch.equal(it["image"], it["clean"])
        for it in items:
            if it["anomalous"]:
                assert it["mask"].sum() > 0 and not torch.equal(it["image"], it["clean"])
            assert it["image"].shape == (3, SIZE, SIZE) and it["mask"].shape == (1, SIZE, SIZE)
    assert all(_stream(anomaly_sources, ratio=0.0)[g]["anomalous"] for g in range(8))
    assert not any(_stream(anomaly_sources, ratio=1.0)[g]["anomalous"] for g in range(8))
    assert [stream.is_normal_sample(g, 0.25) for g in range(8)].count(True) == 2


def test_stream_epochs_visit_every_image_once(anomaly_sources):
    samples = _stream(anomaly_sources)
    n = len(samples.samples)
    for epoch in range(3):
        assert sorted(samples.image_index(g) for g in range(epoch * n, (epoch + 1) * n)) == list(
            range(n)
        )
    assert [samples.image_index(g) for g in range(n)] != [
        samples.image_index(g) for g in range(n, 2 * n)
    ]


def test_stream_is_deterministic_and_independent_of_the_rank_split(anomaly_sources):
    one = _stream(anomaly_sources)
    single = list(stream.StreamSampler(0, 3, 8))
    ranks = [list(stream.StreamSampler(0, 3, 8, rank=r, world_size=2)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == single and not set(ranks[0]) & set(ranks[1])
    assert ranks[1][:4] == [4, 5, 6, 7]
    fresh = _stream(anomaly_sources)  # another process: a fresh object, same seed
    for g in ranks[1]:
        a, b = one[g], fresh[g]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(_stream(anomaly_sources, seed=1)[1]["image"], one[1]["image"])
    # a resumed sampler yields exactly the tail
    assert list(stream.StreamSampler(2, 3, 8)) == single[16:]
    with pytest.raises(UserError, match="not divisible"):
        stream.StreamSampler(0, 1, 6, world_size=4)


def test_stream_through_dataloader_workers(anomaly_sources):
    samples = _stream(anomaly_sources)
    batches = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(
            samples, batch_size=4, num_workers=workers, sampler=stream.StreamSampler(0, 2, 4)
        )
        batches[workers] = list(loader)
    for a, b in zip(batches[0], batches[2]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert a["anomalous"].tolist() == [False, True, False, True]


def test_dump_examples(anomaly_sources, tmp_path):
    written = stream.dump_examples(_stream(anomaly_sources), 3, str(tmp_path / "ex"))
    names = sorted(os.path.basename(p) for p in written)
    assert names == [
        "contact_sheet.png",
        "example_00.png",
        "example_00_mask.png",
        "example_01.png",
        "example_01_mask.png",
        "example_02.png",
        "example_02_mask.png",
    ]
    mask = data.load_mask(str(tmp_path / "ex" / "example_01_mask.png"))
    assert mask.shape == (SIZE, SIZE) and mask.sum() > 0


def test_each_category_gets_its_own_synthesizer(anomaly_sources):
    ds = data.open_dataset(anomaly_sources["data"])
    synth = anomalies.AnomalySynthesizer("washer", ds.format, SIZE, dtd_dir=anomaly_sources["dtd"])
    with pytest.raises(UserError, match="no anomaly synthesizer for category washer"):
        stream.AnomalyStream(ds.train("washer"), SIZE, {"tablet": synth})


def test_epoch_order_is_a_seeded_permutation_per_epoch():
    order = stream.EpochOrder(5, seed=3)
    assert [order(g) for g in range(5)] == np.random.default_rng([3, 0]).permutation(5).tolist()
    assert [order(g) for g in range(5, 10)] == np.random.default_rng([3, 1]).permutation(
        5
    ).tolist()
    assert order(2) == stream.EpochOrder(5, seed=3)(2)  # going back an epoch recomputes it
