"""realnet/masks.py, textures.py, synthesis.py, stream.py: Perlin masks, foregrounds, blending,
sources and the training stream."""
import math
import os

import numpy as np
import pytest
import torch

from realnet import data, masks, stream, synthesis, textures
from realnet.cli import UserError
from demo_data import make_demo_dataset, make_demo_textures
from tiny_data import write_image

SIZE = 64


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("anomaly")
    make_demo_dataset(str(root / "demo"), categories=["washer"], image_size=SIZE, n_train=5, n_test_good=1,
                      n_test_defect=1)
    make_demo_textures(str(root / "dtd"), n=2)
    sdas = root / "sdas"
    for i in range(3):
        write_image(str(sdas / f"{i:05d}.png"), size=(SIZE, SIZE), seed=i)
    (sdas / "manifest.json").write_text("{}")   # synthesize.py's manifest: not an image, ignored
    return {"data": str(root / "demo"), "dtd": str(root / "dtd"), "sdas": str(sdas)}


def _draem_rand_perlin_2d_np(shape, res, rng):
    """DRAEM's rand_perlin_2d_np, verbatim except np.random.rand -> rng.random."""
    fade = lambda t: 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3
    lerp = lambda x, y, w: (y - x) * w + x
    delta = (res[0] / shape[0], res[1] / shape[1])
    d = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0:res[0]:delta[0], 0:res[1]:delta[1]].transpose(1, 2, 0) % 1
    angles = 2 * math.pi * rng.random((res[0] + 1, res[1] + 1))
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)
    tile_grads = lambda s1, s2: np.repeat(np.repeat(gradients[s1[0]:s1[1], s2[0]:s2[1]], d[0], axis=0), d[1], axis=1)
    dot = lambda grad, shift: (np.stack((grid[:shape[0], :shape[1], 0] + shift[0],
                                         grid[:shape[0], :shape[1], 1] + shift[1]), axis=-1)
                               * grad[:shape[0], :shape[1]]).sum(axis=-1)
    n00 = dot(tile_grads([0, -1], [0, -1]), [0, 0])
    n10 = dot(tile_grads([1, None], [0, -1]), [-1, 0])
    n01 = dot(tile_grads([0, -1], [1, None]), [0, -1])
    n11 = dot(tile_grads([1, None], [1, None]), [-1, -1])
    t = fade(grid[:shape[0], :shape[1]])
    return math.sqrt(2) * lerp(lerp(n00, n10, t[..., 0]), lerp(n01, n11, t[..., 0]), t[..., 1])


@pytest.mark.parametrize("res", [(1, 1), (2, 8), (32, 4), (16, 16)])
def test_perlin_noise_equals_draem(res):
    ours = masks.rand_perlin_2d((256, 256), res, np.random.default_rng(3))
    theirs = _draem_rand_perlin_2d_np((256, 256), res, np.random.default_rng(3))
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_perlin_noise_any_size_and_mask_statistics():
    noise = masks.rand_perlin_2d((100, 72), (8, 4), np.random.default_rng(0))   # not divisible
    assert noise.shape == (100, 72) and np.isfinite(noise).all() and np.abs(noise).max() < 1.5
    rng = np.random.default_rng(0)
    drawn = [masks.perlin_mask(128, rng) for _ in range(200)]
    assert all(m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0} for m in drawn)
    coverage = np.mean([m.mean() for m in drawn])
    empty = np.mean([not m.any() for m in drawn])
    assert 0.02 < coverage < 0.10      # the authors' masks cover about 5 % on average
    assert 0.0 < empty < 0.15          # and about 5 % of draws are empty: we redraw those


def test_rgb_to_gray_is_opencv_fixed_point():
    image = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [10, 20, 30]]], np.uint8)
    expected = [round(0.299 * r + 0.587 * g + 0.114 * b) for r, g, b in image[0]]
    assert masks.rgb_to_gray(image)[0].tolist() == expected == [76, 150, 29, 255, 18]


def test_otsu_is_the_maximum_between_class_variance():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = np.concatenate([rng.normal(60, 15, 3000), rng.normal(170, 25, 2000)]).clip(0, 255).astype(np.uint8)
        t = masks.otsu_threshold(x)

        def between(t):
            low, high = x[x <= t].astype(float), x[x > t].astype(float)
            return len(low) * len(high) * (low.mean() - high.mean()) ** 2 if len(low) and len(high) else 0
        assert between(t) >= max(between(s) for s in range(255)) * (1 - 1e-9)
        assert 60 < t < 170


def test_triangle_threshold_sits_between_peak_and_tail():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(40, 5, 5000), rng.uniform(60, 220, 800)]).clip(0, 255).astype(np.uint8)
    assert 45 < masks.triangle_threshold(x) < 80
    flipped = 255 - x     # the peak on the bright side: the histogram is mirrored
    assert 255 - 80 < masks.triangle_threshold(flipped) < 255 - 45


def _disc(size=64, fg=220, bg=30, radius=18):
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius ** 2
    image = np.where(disc[..., None], fg, bg).astype(np.uint8).repeat(3, axis=2)
    noise = np.random.default_rng(0).integers(-8, 9, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), disc


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_foreground_rules_and_modes():
    bright, disc = _disc()
    dark, _ = _disc(fg=30, bg=220)
    assert _iou(masks.foreground_mask(bright, "pill", "mvtec") > 0, disc) > 0.95        # Otsu, bright
    assert _iou(masks.foreground_mask(bright, "hazelnut", "mvtec") > 0, disc) > 0.9     # Triangle, bright
    assert _iou(masks.foreground_mask(dark, "screw", "mvtec") > 0, disc) > 0.95         # Otsu, dark
    assert _iou(masks.foreground_mask(bright, "candle", "visa_csv") > 0, disc) > 0.95
    assert masks.foreground_mask(bright, "carpet", "mvtec").all()                       # textures: all
    assert masks.foreground_mask(bright, "02", "btad").all()
    assert masks.foreground_mask(bright, "pill", "mvtec", mode="none").all()
    # auto: the side that owns the border is background, whichever brightness it has
    assert _iou(masks.foreground_mask(bright, "my_part", "folder") > 0, disc) > 0.95
    assert _iou(masks.foreground_mask(dark, "pill", "mvtec", mode="auto") > 0, disc) > 0.95
    texture = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert masks.foreground_mask(texture, "my_cloth", "folder").all()
    with pytest.raises(UserError, match="unknown foreground mode"):
        masks.foreground_mask(bright, "pill", "mvtec", mode="otsu")


def test_blend_is_the_paper_formula():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    source = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = (rng.random((16, 16)) < 0.4).astype(np.float32)
    out = synthesis.blend(image, source, mask, 0.7)
    expected = np.rint(0.7 * source.astype(float) + (1 - 0.7) * image.astype(float))
    assert out.dtype == np.uint8
    assert (out[mask == 0] == image[mask == 0]).all()
    assert (out[mask == 1] == expected[mask == 1]).all()
    assert (synthesis.blend(image, source, mask, 1.0)[mask == 1] == source[mask == 1]).all()


def test_rand_augment_all_ten():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    for augment in textures.DTD_AUGMENTATIONS:
        out = augment(image, rng)
        assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(textures.rand_augment(image, np.random.default_rng(1)), image)


def test_anomaly_source_errors(tmp_path):
    with pytest.raises(UserError, match="no anomaly source"):
        synthesis.AnomalySource(64)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match="--sdas: folder .* has no images"):
        synthesis.AnomalySource(64, sdas_dir=str(tmp_path / "empty"))
    with pytest.raises(UserError, match="--dtd: folder .* has no images"):
        synthesis.AnomalySource(64, dtd_dir=str(tmp_path / "empty"))
    with pytest.raises(UserError, match="does not exist"):
        synthesis.AnomalySource(64, dtd_dir=str(tmp_path / "missing"))


def test_sources_deltas_and_the_mix(demo):
    source = synthesis.AnomalySource(SIZE, sdas_dir=demo["sdas"], dtd_dir=demo["dtd"])
    assert len(source.sdas) == 3 and len(source.dtd) == 10           # the manifest is not an image
    rng = np.random.default_rng(0)
    draws = [source.draw(rng) for _ in range(200)]
    kinds = [d[2] for d in draws]
    assert 70 < kinds.count("sdas") < 130                              # about half each
    assert all(0.5 <= d[1] <= 1.0 for d in draws if d[2] == "sdas")
    assert all(0.2 <= d[1] <= 1.0 for d in draws if d[2] == "dtd")
    assert min(d[1] for d in draws if d[2] == "dtd") < 0.5             # the DTD range reaches below 0.5
    assert all(d[0].shape == (SIZE, SIZE, 3) and d[0].dtype == np.uint8 for d in draws)


def test_masks_are_never_empty_and_inside_the_foreground(demo):
    synth = synthesis.AnomalySynthesizer("washer", "mvtec", SIZE, dtd_dir=demo["dtd"])
    image = data.load_image(data.open_dataset(demo["data"]).train("washer")[0].image, SIZE)
    foreground = masks.foreground_mask(image, "washer", "mvtec")
    assert 0.2 < foreground.mean() < 0.8                               # the ring, not the table
    rng = np.random.default_rng(0)
    for _ in range(60):
        out = synth.synthesize(image, rng)
        assert out["mask"].any()
        assert (out["mask"] <= foreground).all()
        changed = (out["anomalous"] != image).any(axis=-1)
        assert not changed[out["mask"] == 0].any()
    # a foreground of a few pixels: the fallback still gives a non-empty mask inside it
    tiny = np.zeros((SIZE, SIZE), np.float32)
    tiny[30:32, 40:42] = 1
    for seed in range(10):
        mask = synth.draw_mask(tiny, np.random.default_rng(seed))
        assert mask.any() and (mask <= tiny).all()
    assert synth.draw_mask(np.zeros((SIZE, SIZE), np.float32), rng).any()   # a failed threshold: anywhere


def _stream(demo, ratio=0.5, seed=0):
    ds = data.open_dataset(demo["data"])
    synth = synthesis.AnomalySynthesizer("washer", ds.format, SIZE, sdas_dir=demo["sdas"], dtd_dir=demo["dtd"])
    return stream.AnomalyStream(ds.train("washer"), SIZE, {"washer": synth}, seed=seed, normal_ratio=ratio)


def test_stream_half_of_every_batch_is_normal(demo):
    samples = _stream(demo)
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
    assert all(_stream(demo, ratio=0.0)[g]["anomalous"] for g in range(8))
    assert not any(_stream(demo, ratio=1.0)[g]["anomalous"] for g in range(8))
    assert [stream.is_normal_sample(g, 0.25) for g in range(8)].count(True) == 2


def test_stream_epochs_visit_every_image_once(demo):
    samples = _stream(demo)
    n = len(samples.samples)
    for epoch in range(3):
        assert sorted(samples.image_index(g) for g in range(epoch * n, (epoch + 1) * n)) == list(range(n))
    assert [samples.image_index(g) for g in range(n)] != [samples.image_index(g) for g in range(n, 2 * n)]


def test_stream_is_deterministic_and_independent_of_the_rank_split(demo):
    one = _stream(demo)
    single = list(stream.StreamSampler(0, 3, 8))
    ranks = [list(stream.StreamSampler(0, 3, 8, rank=r, world_size=2)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == single and not set(ranks[0]) & set(ranks[1])
    assert ranks[1][:4] == [4, 5, 6, 7]
    fresh = _stream(demo)                         # another process: a fresh object, same seed
    for g in ranks[1]:
        a, b = one[g], fresh[g]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(_stream(demo, seed=1)[1]["image"], one[1]["image"])
    # a resumed sampler yields exactly the tail
    assert list(stream.StreamSampler(2, 3, 8)) == single[16:]
    with pytest.raises(UserError, match="not divisible"):
        stream.StreamSampler(0, 1, 6, world_size=4)


def test_stream_through_dataloader_workers(demo):
    samples = _stream(demo)
    batches = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(samples, batch_size=4, num_workers=workers,
                                             sampler=stream.StreamSampler(0, 2, 4))
        batches[workers] = list(loader)
    for a, b in zip(batches[0], batches[2]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert a["anomalous"].tolist() == [False, True, False, True]


def test_dump_examples(demo, tmp_path):
    written = stream.dump_examples(_stream(demo), 3, str(tmp_path / "ex"))
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["contact_sheet.png", "example_00.png", "example_00_mask.png", "example_01.png",
                     "example_01_mask.png", "example_02.png", "example_02_mask.png"]
    mask = data.load_mask(str(tmp_path / "ex" / "example_01_mask.png"))
    assert mask.shape == (SIZE, SIZE) and mask.sum() > 0


def test_each_category_gets_its_own_synthesizer(demo):
    ds = data.open_dataset(demo["data"])
    synth = synthesis.AnomalySynthesizer("washer", ds.format, SIZE, dtd_dir=demo["dtd"])
    with pytest.raises(UserError, match="no anomaly synthesizer for category washer"):
        stream.AnomalyStream(ds.train("washer"), SIZE, {"tablet": synth})


def test_epoch_order_is_a_seeded_permutation_per_epoch():
    order = stream.EpochOrder(5, seed=3)
    assert [order(g) for g in range(5)] == np.random.default_rng([3, 0]).permutation(5).tolist()
    assert [order(g) for g in range(5, 10)] == np.random.default_rng([3, 1]).permutation(5).tolist()
    assert order(2) == stream.EpochOrder(5, seed=3)(2)    # going back an epoch recomputes it
