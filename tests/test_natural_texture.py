"""benchmarks/natural_texture.py: the natural-texture categories of issue 28 are written in
the MVTec layout, the same for the same seed, and every defect is a real, non-empty
structure inside the image."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)

import natural_texture  # noqa: E402


@pytest.mark.parametrize("category", natural_texture.CATEGORIES)
def test_natural_category_layout_and_determinism(tmp_path, category):
    a = natural_texture.make_natural_category(
        str(tmp_path / "a"), category, seed=3, size=64, n_train=2, n_test_good=1, n_test_defect=4
    )
    b = natural_texture.make_natural_category(
        str(tmp_path / "b"), category, seed=3, size=64, n_train=2, n_test_good=1, n_test_defect=4
    )
    assert sorted(os.listdir(os.path.join(a, "test"))) == sorted(
        ["good"] + natural_texture.DEFECTS
    )
    for defect in natural_texture.DEFECTS:
        image = np.asarray(Image.open(os.path.join(a, "test", defect, "000.png")))
        mask = np.asarray(Image.open(os.path.join(a, "ground_truth", defect, "000_mask.png")))
        assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
        assert 0 < (mask > 127).mean() < 0.3, defect  # a defect, not the whole image
        same = np.asarray(Image.open(os.path.join(b, "test", defect, "000.png")))
        assert np.array_equal(image, same)  # same seed, same files
    train = [
        np.asarray(Image.open(os.path.join(a, "train", "good", f"{i:03d}.png"))) for i in range(2)
    ]
    assert not np.array_equal(*train)  # normal images vary


def test_defect_changes_the_image_where_its_mask_is():
    rng = lambda: np.random.default_rng(5)
    normal, _ = natural_texture.render("sand", rng(), 96)
    broken, mask = natural_texture.render("sand", rng(), 96, "hole")
    changed = np.abs(normal.astype(int) - broken.astype(int)).sum(-1) > 0
    assert mask.any() and changed[mask].mean() > 0.9 and changed[~mask].mean() < 0.2
