"""realnet/textures.py: the DTD augmentations (RandAugment's ten operations)."""

import numpy as np

from realnet import textures


def test_rand_augment_all_ten():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    for augment in textures.DTD_AUGMENTATIONS:
        out = augment(image, rng)
        assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(textures.rand_augment(image, np.random.default_rng(1)), image)
