"""realnet/masks.py: Perlin noise (as DRAEM draws it), the foreground rules and modes, and
the masks the anomaly synthesis uses (never empty, inside the foreground)."""

import math

import numpy as np
import pytest

from realnet import anomalies, data, masks
from realnet.cli import UserError
from tiny_data import SIZE


def _draem_rand_perlin_2d_np(shape, res, rng):
    """DRAEM's rand_perlin_2d_np, verbatim except np.random.rand -> rng.random."""
    fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3
    lerp = lambda x, y, w: (y - x) * w + x
    delta = (res[0] / shape[0], res[1] / shape[1])
    d = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0 : res[0] : delta[0], 0 : res[1] : delta[1]].transpose(1, 2, 0) % 1
    angles = 2 * math.pi * rng.random((res[0] + 1, res[1] + 1))
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)
    tile_grads = lambda s1, s2: np.repeat(
        np.repeat(gradients[s1[0] : s1[1], s2[0] : s2[1]], d[0], axis=0), d[1], axis=1
    )
    dot = lambda grad, shift: (
        np.stack(
            (
                grid[: shape[0], : shape[1], 0] + shift[0],
                grid[: shape[0], : shape[1], 1] + shift[1],
            ),
            axis=-1,
        )
        * grad[: shape[0], : shape[1]]
    ).sum(axis=-1)
    n00 = dot(tile_grads([0, -1], [0, -1]), [0, 0])
    n10 = dot(tile_grads([1, None], [0, -1]), [-1, 0])
    n01 = dot(tile_grads([0, -1], [1, None]), [0, -1])
    n11 = dot(tile_grads([1, None], [1, None]), [-1, -1])
    t = fade(grid[: shape[0], : shape[1]])
    return math.sqrt(2) * lerp(lerp(n00, n10, t[..., 0]), lerp(n01, n11, t[..., 0]), t[..., 1])


@pytest.mark.parametrize("res", [(1, 1), (2, 8), (32, 4), (16, 16)])
def test_perlin_noise_equals_draem(res):
    ours = masks.rand_perlin_2d((256, 256), res, np.random.default_rng(3))
    theirs = _draem_rand_perlin_2d_np((256, 256), res, np.random.default_rng(3))
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_perlin_noise_any_size_and_mask_statistics():
    noise = masks.rand_perlin_2d((100, 72), (8, 4), np.random.default_rng(0))  # not divisible
    assert noise.shape == (100, 72) and np.isfinite(noise).all() and np.abs(noise).max() < 1.5
    rng = np.random.default_rng(0)
    drawn = [masks.perlin_mask(128, rng) for _ in range(200)]
    assert all(m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0} for m in drawn)
    coverage = np.mean([m.mean() for m in drawn])
    empty = np.mean([not m.any() for m in drawn])
    assert 0.02 < coverage < 0.10  # the authors' masks cover about 5 % on average
    assert 0.0 < empty < 0.15  # and about 5 % of draws are empty: we redraw those


def test_rgb_to_gray_is_opencv_fixed_point():
    image = np.array(
        [[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [10, 20, 30]]], np.uint8
    )
    expected = [round(0.299 * r + 0.587 * g + 0.114 * b) for r, g, b in image[0]]
    assert masks.rgb_to_gray(image)[0].tolist() == expected == [76, 150, 29, 255, 18]


def test_otsu_is_the_maximum_between_class_variance():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = (
            np.concatenate([rng.normal(60, 15, 3000), rng.normal(170, 25, 2000)])
            .clip(0, 255)
            .astype(np.uint8)
        )
        t = masks.otsu_threshold(x)

        def between(t):
            low, high = x[x <= t].astype(float), x[x > t].astype(float)
            return (
                len(low) * len(high) * (low.mean() - high.mean()) ** 2
                if len(low) and len(high)
                else 0
            )

        assert between(t) >= max(between(s) for s in range(255)) * (1 - 1e-9)
        assert 60 < t < 170


def test_triangle_threshold_sits_between_peak_and_tail():
    rng = np.random.default_rng(0)
    x = (
        np.concatenate([rng.normal(40, 5, 5000), rng.uniform(60, 220, 800)])
        .clip(0, 255)
        .astype(np.uint8)
    )
    assert 45 < masks.triangle_threshold(x) < 80
    flipped = 255 - x  # the peak on the bright side: the histogram is mirrored
    assert 255 - 80 < masks.triangle_threshold(flipped) < 255 - 45


def _disc(size=64, fg=220, bg=30, radius=18):
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius**2
    image = np.where(disc[..., None], fg, bg).astype(np.uint8).repeat(3, axis=2)
    noise = np.random.default_rng(0).integers(-8, 9, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), disc


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_foreground_rules_and_modes():
    bright, disc = _disc()
    dark, _ = _disc(fg=30, bg=220)
    assert _iou(masks.foreground_mask(bright, "pill", "mvtec") > 0, disc) > 0.95  # Otsu, bright
    assert (
        _iou(masks.foreground_mask(bright, "hazelnut", "mvtec") > 0, disc) > 0.9
    )  # Triangle, bright
    assert _iou(masks.foreground_mask(dark, "screw", "mvtec") > 0, disc) > 0.95  # Otsu, dark
    assert _iou(masks.foreground_mask(bright, "candle", "visa_csv") > 0, disc) > 0.95
    assert masks.foreground_mask(bright, "carpet", "mvtec").all()  # textures: all
    assert masks.foreground_mask(bright, "02", "btad").all()
    assert masks.foreground_mask(bright, "pill", "mvtec", mode="none").all()
    # auto: the side that owns the border is background, whichever brightness it has
    assert _iou(masks.foreground_mask(bright, "my_part", "folder") > 0, disc) > 0.95
    assert _iou(masks.foreground_mask(dark, "pill", "mvtec", mode="auto") > 0, disc) > 0.95
    texture = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert masks.foreground_mask(texture, "my_cloth", "folder").all()
    with pytest.raises(UserError, match="unknown foreground mode"):
        masks.foreground_mask(bright, "pill", "mvtec", mode="otsu")


def test_masks_are_never_empty_and_inside_the_foreground(anomaly_sources):
    synth = anomalies.AnomalySynthesizer("washer", "mvtec", SIZE, dtd_dir=anomaly_sources["dtd"])
    image = data.load_image(
        data.open_dataset(anomaly_sources["data"]).train("washer")[0].image, SIZE
    )
    foreground = masks.foreground_mask(image, "washer", "mvtec")
    assert 0.2 < foreground.mean() < 0.8  # the ring, not the table
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
    assert synth.draw_mask(
        np.zeros((SIZE, SIZE), np.float32), rng
    ).any()  # a failed threshold: anywhere
