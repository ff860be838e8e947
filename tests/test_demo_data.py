"""demo_data.py: the embedded data set is deterministic, readable and sensible."""

import filecmp
import os

import numpy as np
import pytest
from PIL import Image

import demo_data
from realnet import data
from realnet.cli import UserError

SETTINGS = dict(image_size=48, n_train=3, n_test_good=2, n_test_defect=4)


def _files(root):
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )


def test_same_seed_same_bytes_and_other_seed_other_images(tmp_path):
    a = demo_data.make_demo_dataset(str(tmp_path / "a"), seed=0, **SETTINGS)
    b = demo_data.make_demo_dataset(str(tmp_path / "b"), seed=0, **SETTINGS)
    c = demo_data.make_demo_dataset(str(tmp_path / "c"), seed=1, categories=["weave"], **SETTINGS)
    files = [f for f in _files(a) if f.endswith(".png")]
    assert files == [f for f in _files(b) if f.endswith(".png")]
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors and len(match) == len(files) == 4 * (3 + 2 + 4 * 2)
    assert not filecmp.cmp(
        os.path.join(a, "weave/train/good/000.png"),
        os.path.join(c, "weave/train/good/000.png"),
        shallow=False,
    )
    # a category alone is the same as within the full set
    d = demo_data.make_demo_dataset(str(tmp_path / "d"), seed=0, categories=["tablet"], **SETTINGS)
    assert filecmp.cmp(
        os.path.join(a, "tablet/test/chip/000.png"),
        os.path.join(d, "tablet/test/chip/000.png"),
        shallow=False,
    )


def test_layout_is_readable_and_masks_match(tmp_path):
    root = demo_data.make_demo_dataset(str(tmp_path / "demo"), **SETTINGS)
    ds = data.open_dataset(root)
    assert ds.format == "mvtec" and ds.categories == demo_data.DEMO_CATEGORIES
    assert set(demo_data.DEMO_OBJECTS) | set(demo_data.DEMO_TEXTURES) == set(
        demo_data.DEMO_CATEGORIES
    )
    for category in ds.categories:
        assert len(ds.train(category)) == 3
        test = ds.test(category)
        bad = [s for s in test if s.label]
        assert len(test) == 6 and {s.defect for s in bad} == set(demo_data.DEFECTS[category])
        for s in bad:
            image, mask = Image.open(s.image), data.load_mask(s.mask)
            assert image.size == (48, 48) and mask.shape == (48, 48)
            assert 0.001 < mask.mean() < 0.25, (
                s.image,
                mask.mean(),
            )  # visible, not the whole image
            assert s.mask.endswith("_mask.png")


def test_defects_change_the_image_where_the_mask_is():
    for category, defects in demo_data.DEFECTS.items():
        for defect in defects:
            for i in range(3):
                rng = np.random.default_rng([7, i])
                normal, _ = demo_data.render(category, np.random.default_rng([7, i]), 128, None)
                broken, mask = demo_data.render(category, rng, 128, defect)
                assert mask.shape == (128, 128) and mask.dtype == bool
                assert 0.002 < mask.mean() < 0.1, (category, defect, mask.mean())
                # the defect is visible: under its mask the picture differs from a defect-free one
                diff = np.abs(broken.astype(int) - normal.astype(int)).max(axis=-1)
                assert diff[mask].mean() > 25, (category, defect, diff[mask].mean())


def test_kept_when_settings_match_and_remade_when_not(tmp_path, capsys):
    root = str(tmp_path / "demo")
    demo_data.make_demo_dataset(root, categories=["granite"], **SETTINGS)
    marker = os.path.join(root, "granite", "train", "good", "extra.txt")
    open(marker, "w").close()
    demo_data.make_demo_dataset(root, categories=["granite"], **SETTINGS)
    assert os.path.exists(marker)  # same settings: untouched
    before = _files(root)
    # other settings: remade, but a file the generator did not write is never deleted
    with pytest.raises(UserError, match="extra.txt' was not written by the demo generator"):
        demo_data.make_demo_dataset(root, categories=["granite"], **{**SETTINGS, "image_size": 32})
    assert _files(root) == before
    os.unlink(marker)
    capsys.readouterr()
    demo_data.make_demo_dataset(root, categories=["granite"], **{**SETTINGS, "n_train": 2})
    assert "remade (n_train: 3 there, 2 now)" in capsys.readouterr().out
    assert len(os.listdir(os.path.join(root, "granite", "train", "good"))) == 2
    os.makedirs(os.path.join(str(tmp_path), "mine", "washer", "train"))
    with pytest.raises(UserError, match="not written by the demo generator"):
        demo_data.make_demo_dataset(str(tmp_path / "mine"), categories=["washer"], **SETTINGS)
    with pytest.raises(UserError, match="unknown demo category"):
        demo_data.make_demo_dataset(root, categories=["bottle"])


def test_textures_in_dtd_layout(tmp_path):
    root = demo_data.make_demo_textures(str(tmp_path / "dtd"), n=2)
    for texture in demo_data.DTD_TEXTURES:
        names = sorted(os.listdir(os.path.join(root, "images", texture)))
        assert names == [f"{texture}_000.png", f"{texture}_001.png"]
    sizes = {
        Image.open(os.path.join(root, "images", "dotted", n)).size
        for n in ("dotted_000.png", "dotted_001.png")
    }
    assert all(w != h or w >= 160 for w, h in sizes)


def test_cli_prints_what_it_wrote(tmp_path, capsys):
    demo_data.main(
        [
            "--out",
            str(tmp_path / "demo"),
            "--dtd-out",
            str(tmp_path / "dtd"),
            "--categories",
            "washer",
            "--size",
            "32",
            "--train",
            "2",
            "--test-good",
            "1",
            "--test-defect",
            "2",
            "--textures",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "washer: 2 train, 1 good + 2 defective" in out and "5 textures" in out
    assert os.path.isfile(tmp_path / "demo" / "washer" / "ground_truth" / "bent" / "000_mask.png")


def test_bad_counts_and_an_out_that_is_a_file_are_one_line_errors(tmp_path):
    for flag, value in (
        ("--train", "0"),
        ("--test-good", "0"),
        ("--test-defect", "-1"),
        ("--textures", "0"),
    ):
        with pytest.raises(UserError, match=f"^{flag} must be >= 1"):
            demo_data.main(
                [
                    "--out",
                    str(tmp_path / "demo"),
                    "--dtd-out",
                    str(tmp_path / "dtd"),
                    "--categories",
                    "washer",
                    "--size",
                    "32",
                    flag,
                    value,
                ]
            )
    assert not os.path.exists(tmp_path / "demo" / "washer")
    (tmp_path / "a_file").write_text("mine")
    for flag in ("--out", "--dtd-out"):
        folders = {
            "--out": str(tmp_path / "demo"),
            "--dtd-out": str(tmp_path / "dtd"),
            flag: str(tmp_path / "a_file"),
        }
        with pytest.raises(UserError, match=f"^{flag} '.*a_file' is a file, expected a folder"):
            demo_data.main(
                [a for item in folders.items() for a in item]
                + ["--categories", "washer", "--size", "32"]
            )
    assert (tmp_path / "a_file").read_text() == "mine"
