"""realnet/data.py: every layout read from generated folders, pixels, and one-line errors."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from realnet import data
from realnet.cli import UserError
from tiny_data import mvtec_tree, write_image, write_mask


def test_mvtec_layout_grayscale_and_known_category_order(tmp_path):
    root = mvtec_tree(
        str(tmp_path),
        categories=("screw", "bottle"),
        defects=("scratch_head", "thread"),
        gray=True,
    )
    ds = data.open_dataset(root)
    assert ds.format == "mvtec"
    assert ds.categories == ["bottle", "screw"]  # the authors' class-id order
    assert ds.class_id("screw") == 1
    train, test = ds.train("screw"), ds.test("screw")
    assert [os.path.basename(s.image) for s in train] == ["000.png", "001.png"]
    assert all(s.label == 0 and s.mask is None and s.defect == "good" for s in train)
    bad = [s for s in test if s.label == 1]
    assert len(test) == 6 and len(bad) == 4
    assert {s.defect for s in bad} == {"scratch_head", "thread"}
    for s in bad:
        assert s.mask.endswith(
            os.path.join(s.defect, os.path.basename(s.image)[:-4] + "_mask.png")
        )
    assert [s.image for s in test] == sorted(s.image for s in test)
    image = data.load_image(train[0].image, 24)  # grayscale file -> RGB
    assert image.shape == (24, 24, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_unknown_categories_are_sorted_and_mpdd_is_recognised(tmp_path):
    own = mvtec_tree(str(tmp_path / "own"), categories=("zeta", "alpha", "mid"))
    assert data.open_dataset(own).categories == ["alpha", "mid", "zeta"]
    mpdd = mvtec_tree(
        str(tmp_path / "mpdd"), categories=("tubes", "bracket_black"), defects=("hole",)
    )
    ds = data.open_dataset(mpdd)
    assert ds.format == "mpdd" and ds.categories == ["bracket_black", "tubes"]


def test_btad_layout_bmp_images_and_masks(tmp_path):
    root = str(tmp_path)
    mvtec_tree(root, categories=("01",), normal="ok", defects=("ko",), ext=".bmp", mask_suffix="")
    mvtec_tree(
        root,
        categories=("03",),
        normal="ok",
        defects=("ko",),
        ext=".bmp",
        mask_ext=".bmp",
        mask_suffix="",
    )
    mvtec_tree(root, categories=("02",), normal="ok", defects=("ko",), ext=".png", mask_suffix="")
    ds = data.open_dataset(root)
    assert ds.format == "btad" and ds.categories == ["01", "02", "03"]
    test = ds.test("03")
    bad = [s for s in test if s.label]
    assert {s.defect for s in test} == {"good", "ko"} and len(bad) == 2
    assert all(s.mask.endswith(".bmp") for s in bad)
    mask = data.load_mask(bad[0].mask, 20)
    assert mask.shape == (20, 20) and set(np.unique(mask)) == {0.0, 1.0}


def test_visa_reformat_with_jpg(tmp_path):
    root = mvtec_tree(
        str(tmp_path),
        categories=("pcb1", "candle"),
        normal="ok",
        defects=("ko",),
        ext=".JPG",
        mask_suffix="",
    )
    ds = data.open_dataset(root)
    assert ds.format == "visa" and ds.categories == ["candle", "pcb1"]
    assert all(s.image.endswith(".JPG") for s in ds.train("pcb1"))
    assert data.load_image(ds.train("pcb1")[0].image, 16).shape == (16, 16, 3)


def _visa_download(root, rows_extra=()):
    rows = ["object,split,label,image,mask"]
    for c in ("pcb2", "candle"):
        for i in range(2):
            p = f"{c}/Data/Images/Normal/{i:04d}.JPG"
            write_image(os.path.join(root, p), seed=i)
            rows.append(f"{c},train,normal,{p},")
            q = f"{c}/Data/Images/Normal/{10 + i:04d}.JPG"
            write_image(os.path.join(root, q), seed=10 + i)
            rows.append(f"{c},test,normal,{q},")
            a, m = f"{c}/Data/Images/Anomaly/{i:03d}.JPG", f"{c}/Data/Masks/Anomaly/{i:03d}.png"
            write_image(os.path.join(root, a), seed=20 + i)
            write_mask(os.path.join(root, m), value=1)  # VisA stores small values
            rows.append(f"{c},test,anomaly,{a},{m}")
    rows += list(rows_extra)
    os.makedirs(os.path.join(root, "split_csv"), exist_ok=True)
    with open(os.path.join(root, "split_csv", "1cls.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return root


def test_visa_official_csv_split(tmp_path):
    root = _visa_download(str(tmp_path))
    ds = data.open_dataset(root)
    assert ds.format == "visa_csv" and ds.categories == ["candle", "pcb2"]
    assert len(ds.train("pcb2")) == 2
    test = ds.test("pcb2")
    bad = [s for s in test if s.label]
    assert len(test) == 4 and len(bad) == 2 and all(s.defect == "anomaly" for s in bad)
    assert data.load_mask(bad[0].mask).sum() == 100  # value 1 counts as anomalous (> 0)


def test_visa_csv_bad_rows_are_one_line_errors(tmp_path):
    root = _visa_download(str(tmp_path), rows_extra=["pcb2,val,normal,x.JPG,"])
    with pytest.raises(UserError, match="line 14: unknown split"):
        data.open_dataset(root)


def test_folder_layout(tmp_path):
    mvtec_tree(
        str(tmp_path),
        categories=("my_part",),
        defects=("dent", "scratch"),
        mask_suffix="",
        mask_folder="masks",
    )
    ds = data.open_dataset(str(tmp_path / "my_part"))
    assert ds.format == "folder" and ds.categories == ["my_part"]
    bad = [s for s in ds.test("my_part") if s.label]
    assert len(bad) == 4 and all("masks" in s.mask for s in bad)
    # an MVTec category folder given on its own reads as a folder too (ground_truth/ accepted)
    mvtec_tree(str(tmp_path / "mv"), categories=("bottle",))
    assert data.open_dataset(str(tmp_path / "mv" / "bottle"), "auto").format == "folder"


def test_format_override(tmp_path):
    root = mvtec_tree(str(tmp_path), categories=("bottle",))
    assert data.open_dataset(root, format="mpdd").format == "mpdd"
    with pytest.raises(UserError, match="split_csv"):
        data.open_dataset(root, format="visa_csv")
    with pytest.raises(UserError, match="no train/ folder"):
        data.open_dataset(root, format="folder")
    with pytest.raises(UserError, match="unknown data set format"):
        data.open_dataset(root, format="coco")
    assert data.open_dataset(root, categories=["bottle"]).categories == ["bottle"]
    with pytest.raises(UserError, match="'cable' is not in"):
        data.open_dataset(root, categories="cable")


def test_load_mask_binarises_and_resizes_nearest(tmp_path):
    path = str(tmp_path / "m.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 3
    Image.fromarray(mask).save(path)
    out = data.load_mask(path, 16)
    assert out.dtype == np.float32 and set(np.unique(out)) == {0.0, 1.0}
    assert out.sum() == 64
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[0:4, 0:4, 2] = 200
    Image.fromarray(rgb).save(path)
    assert data.load_mask(path).sum() == 16


def test_to_tensor_and_testset(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0] = 255
    x = data.to_tensor(image)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full((8, 8), (1 - 0.485) / 0.229))
    assert torch.allclose(x[1], torch.full((8, 8), -0.456 / 0.224))
    root = mvtec_tree(str(tmp_path), categories=("bottle",))
    ds = data.open_dataset(root)
    test = data.TestSet(ds.test("bottle"), 20)
    items = [test[i] for i in range(len(test))]
    assert all(
        it["image"].shape == (3, 20, 20) and it["mask"].shape == (1, 20, 20) for it in items
    )
    assert [it["label"] for it in items] == [0, 0, 1, 1]
    assert all(it["mask"].sum() == 0 for it in items if it["label"] == 0)
    assert all(it["mask"].sum() > 0 for it in items if it["label"] == 1)
    assert items[3]["index"] == 3 and items[3]["defect"] == "scratch"


# ---------------------------------------------------------------------------------------
# Bad input: one UserError naming the file
# ---------------------------------------------------------------------------------------


def test_missing_root_and_unknown_layout(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.open_dataset(str(tmp_path / "nope"))
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "a.txt").write_text("x")
    with pytest.raises(UserError, match="unknown layout"):
        data.open_dataset(str(tmp_path / "stuff"))


def test_unreadable_image(tmp_path):
    root = mvtec_tree(str(tmp_path), categories=("bottle",))
    broken = os.path.join(root, "bottle", "train", "good", "005.png")
    with open(broken, "wb") as f:
        f.write(b"this is not a png")
    with pytest.raises(UserError, match="005.png' is not a readable image"):
        data.open_dataset(root).train("bottle")
    with pytest.raises(UserError, match="not a readable image"):
        data.load_image(broken, 16)


def test_mask_size_differs_from_image(tmp_path):
    root = mvtec_tree(str(tmp_path), categories=("bottle",))
    write_mask(
        os.path.join(root, "bottle", "ground_truth", "scratch", "001_mask.png"), size=(20, 20)
    )
    with pytest.raises(UserError, match=r"001_mask.png' is 20x20 but its image .* is 40x32"):
        data.open_dataset(root).test("bottle")


def test_mask_without_image(tmp_path):
    root = mvtec_tree(str(tmp_path), categories=("bottle",))
    write_mask(os.path.join(root, "bottle", "ground_truth", "scratch", "007_mask.png"))
    with pytest.raises(UserError, match="007_mask.png' has no test image"):
        data.open_dataset(root).test("bottle")


def test_defective_image_without_mask(tmp_path):
    root = mvtec_tree(str(tmp_path), categories=("bottle",))
    os.remove(os.path.join(root, "bottle", "ground_truth", "scratch", "000_mask.png"))
    with pytest.raises(UserError, match="000.png' has no mask"):
        data.open_dataset(root).test("bottle")


def test_no_training_images(tmp_path):
    root = mvtec_tree(str(tmp_path), categories=("bottle",))
    for name in os.listdir(os.path.join(root, "bottle", "train", "good")):
        os.remove(os.path.join(root, "bottle", "train", "good", name))
    with pytest.raises(UserError, match="no training images"):
        data.open_dataset(root).train("bottle")
