"""The second round of faults (issue 26): every input read right or refused in one line,
every output folder owned by one run, on tiny data (a 64 px demo category, random backbone).

Each case runs a stage as the user would, through `cli.run` (in this process: `stage`, or as
a real process: `process`), with the DEFAULT --workers where the stage starts loaders, so an
error raised in a loader worker is seen as the user sees it. A refused run must leave the
files of an earlier one as they were."""

import functools
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import stages
from realnet import cli, data
from stages import ENV, REPO, run, succeeded

# one way to run a stage (tests/stages.py): in this process, or as a real process
stage = functools.partial(run, check=False, in_process=True)
process = functools.partial(run, check=False)
one_line_error = functools.partial(stages.one_line_error, alone=True)


def snapshot(folder):
    """Every file under `folder` with its bytes."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def cut_in_half(path):
    """Keep the first half of a file: its header still reads, its pixels are cut short."""
    content = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(content[: len(content) // 2])
    return path


def write_afs(path, backbone, layers=(1, 2), dims=(8, 16), input_size=64, category="washer"):
    """An AFS file in the format select_features.py writes."""
    channels = {1: 256, 2: 512}
    g = torch.Generator().manual_seed(0)
    torch.save(
        {
            "kind": "afs",
            "version": 1,
            "layers": list(layers),
            "dims": list(dims),
            "indices": [
                torch.sort(torch.randperm(channels[l], generator=g)[:d]).values
                for l, d in zip(layers, dims)
            ],
            "scores": [torch.rand(channels[l], generator=g) for l in layers],
            "backbone": backbone,
            "input_size": input_size,
            "category": category,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from demo_data import make_demo_dataset, make_demo_textures
    from realnet.backbone import load_backbone

    root = tmp_path_factory.mktemp("faults")
    dataset = make_demo_dataset(
        str(root / "data"),
        categories=["washer"],
        image_size=64,
        n_train=6,
        n_test_good=2,
        n_test_defect=2,
    )
    dtd = make_demo_textures(str(root / "dtd"), n=1)
    afs = write_afs(str(root / "afs.pt"), load_backbone("random", (1,)).identity)
    return {"root": root, "data": dataset, "dtd": dtd, "afs": afs}


def train_args(demo, out, *extra, data_root=None, steps=2):
    """train_realnet.py on the tiny demo; --workers is left at its default (2)."""
    return [
        "--data",
        data_root or demo["data"],
        "--category",
        "washer",
        "--dtd",
        demo["dtd"],
        "--afs",
        demo["afs"],
        "--batch-size",
        "4",
        "--steps",
        steps,
        "--log-every",
        "1",
        "--out",
        out,
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(demo):
    """A finished 2-step run (default --workers)."""
    out = str(demo["root"] / "trained")
    succeeded(stage("train_realnet.py", *train_args(demo, out)))
    return out


def copy_category(demo, tmp_path, name="data"):
    """A copy of the demo data set to break."""
    return shutil.copytree(demo["data"], str(tmp_path / name))


def washer(root, *parts):
    return os.path.join(root, "washer", *parts)


# ----------------------------------------------------------------------------------------
# Reading pixels: every bit depth and mode, EXIF orientation
# ----------------------------------------------------------------------------------------

GRADIENT = np.linspace(0, 1, 32 * 40).reshape(32, 40)


@pytest.mark.parametrize("kind", ["png16", "tiff16", "float01", "float255"])
def test_deep_images_are_scaled_to_8_bits_not_clipped_to_white(tmp_path, kind):
    path = str(tmp_path / ("image.png" if kind == "png16" else "image.tif"))
    if kind in ("png16", "tiff16"):
        Image.fromarray(np.rint(GRADIENT * 65535).astype(np.uint16)).save(path)
    else:
        scale = 1.0 if kind == "float01" else 255.0
        Image.fromarray((GRADIENT * scale).astype(np.float32), "F").save(path)
    image = data.load_image(path)
    assert image.shape == (32, 40, 3)
    np.testing.assert_allclose(image[..., 0], np.rint(GRADIENT * 255), atol=1)


def test_a_palette_image_with_transparency_reads_its_colours_without_a_warning(tmp_path):
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.info["transparency"] = 0
    path = str(tmp_path / "palette.png")
    palette.save(path, transparency=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = data.load_image(path)
    assert tuple(image[0, 0]) == (200, 100, 50)


def test_grey_with_alpha_reads_its_grey_not_its_alpha(tmp_path):
    path = str(tmp_path / "la.png")
    Image.merge("LA", [Image.new("L", (8, 8), 90), Image.new("L", (8, 8), 0)]).save(path)
    assert (data.load_image(path) == 90).all()


def test_a_float_image_outside_any_known_range_is_refused(tmp_path):
    path = str(tmp_path / "depth.tif")
    Image.fromarray(np.full((8, 8), 1e6, np.float32), "F").save(path)
    with pytest.raises(cli.UserError, match="depth.tif' is a float image with values outside"):
        data.load_image(path)


def write_turned_jpeg(path, size=(40, 32)):
    """A JPEG stored sideways (w x h = 40 x 32) with EXIF orientation 6 (a viewer turns it
    90 degrees clockwise): a bright box at the stored image's top-left corner."""
    pixels = np.full((size[1], size[0], 3), 20, np.uint8)
    pixels[0:8, 0:12] = 240
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[data.ORIENTATION_TAG] = 6
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_turns_image_and_its_size_alike(tmp_path):
    path = write_turned_jpeg(str(tmp_path / "turned.jpg"))
    assert data.image_size_of(path) == (32, 40)  # upright: w 32, h 40
    image = data.load_image(path)
    assert image.shape == (40, 32, 3)
    # turned clockwise, the stored top-left box is at the top-right, 8 wide and 12 high
    assert image[0:12, 24:32].mean() > 200 and image[0:12, 0:8].mean() < 60


def test_a_mask_drawn_on_the_upright_image_fits_its_exif_turned_image(tmp_path):
    root = str(tmp_path / "set")
    from tiny_data import write_image

    for i in range(2):
        write_image(os.path.join(root, "part", "train", "good", f"{i:03d}.png"), size=(32, 40))
    write_turned_jpeg(os.path.join(root, "part", "test", "dent", "000.jpg"))
    mask = np.zeros((40, 32), np.uint8)
    mask[0:12, 24:32] = 255  # where a viewer shows the box
    os.makedirs(os.path.join(root, "part", "ground_truth", "dent"))
    Image.fromarray(mask).save(os.path.join(root, "part", "ground_truth", "dent", "000_mask.png"))
    item = data.TestSet(data.open_dataset(root).test("part"), 40)[0]
    image, mask = item["image"][0], item["mask"][0]
    assert image[mask > 0].mean() > image[mask == 0].mean() + 2  # the box lies under its mask


# ----------------------------------------------------------------------------------------
# Reading masks: binarised at a stated level, or refused
# ----------------------------------------------------------------------------------------


def test_stray_low_values_of_a_jpeg_saved_mask_are_not_defect(tmp_path):
    mask = np.random.default_rng(0).integers(0, 4, (32, 40)).astype(np.uint8)  # 0-3 noise
    mask[5:10, 5:10] = 252
    path = str(tmp_path / "mask.png")
    Image.fromarray(mask).save(path)
    assert data.load_mask(path).sum() == 25


def test_a_real_jpeg_saved_mask_keeps_its_area(tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[20:36, 20:36] = 255
    path = str(tmp_path / "mask.jpg")
    Image.fromarray(mask).save(path, quality=60)
    assert abs(data.load_mask(path).sum() - 256) <= 16


def test_a_16_bit_mask_and_a_label_mask_read_as_their_defect(tmp_path):
    deep = np.zeros((20, 20), np.uint16)
    deep[2:6, 2:6] = 65535
    Image.fromarray(deep).save(str(tmp_path / "deep.png"))
    assert data.load_mask(str(tmp_path / "deep.png")).sum() == 16
    label = np.zeros((20, 20), np.uint8)
    label[2:5, 2:5] = 1  # VisA: a small class value
    Image.fromarray(label).save(str(tmp_path / "label.png"))
    assert data.load_mask(str(tmp_path / "label.png")).sum() == 9


def test_a_picture_given_as_a_mask_is_refused_naming_it(tmp_path):
    photo = np.random.default_rng(1).integers(0, 256, (20, 20)).astype(np.uint8)
    Image.fromarray(photo).save(str(tmp_path / "photo.png"))
    with pytest.raises(cli.UserError, match=r"photo.png' is not a mask: \d+% of its pixels"):
        data.load_mask(str(tmp_path / "photo.png"))
    dark = (np.arange(400).reshape(20, 20) % 100).astype(np.uint8)  # 100 levels, all < 128
    Image.fromarray(dark).save(str(tmp_path / "dark.png"))
    with pytest.raises(cli.UserError, match="dark.png' is not a mask: 100 distinct values"):
        data.load_mask(str(tmp_path / "dark.png"))


def test_evaluate_refuses_a_picture_given_as_a_mask_in_one_line(demo, trained, tmp_path):
    root = copy_category(demo, tmp_path)
    mask = os.path.join(root, "washer", "ground_truth", "chip", "000_mask.png")
    size = Image.open(mask).size
    photo = np.random.default_rng(2).integers(0, 256, (size[1], size[0])).astype(np.uint8)
    Image.fromarray(photo).save(mask)
    out = str(tmp_path / "eval")
    one_line_error(
        stage(
            "evaluate.py",
            "--checkpoint",
            os.path.join(trained, "model.pt"),
            "--data",
            root,
            "--out",
            out,
            "--throughput-repeats",
            "1",
        ),
        "000_mask.png' is not a mask",
    )
    assert not os.path.exists(os.path.join(out, "metrics.json"))


# ----------------------------------------------------------------------------------------
# Skipped files are counted
# ----------------------------------------------------------------------------------------


def test_broken_links_and_folders_named_like_images_are_skipped_and_counted(tmp_path, capsys):
    folder = tmp_path / "good"
    folder.mkdir()
    from tiny_data import write_image

    write_image(str(folder / "000.png"))
    os.symlink(str(tmp_path / "gone.png"), str(folder / "001.png"))
    (folder / "002.png").mkdir()
    assert data.list_images(str(folder)) == [str(folder / "000.png")]
    line = capsys.readouterr().out.strip()
    assert (
        line.startswith("note: skipped 2 file(s) in")
        and "1 broken link" in line
        and "1 not a file" in line
        and "001.png" in line
    )


def test_training_reports_a_broken_link_among_its_images_and_trains(demo, tmp_path):
    root = copy_category(demo, tmp_path)
    os.symlink(str(tmp_path / "gone.png"), washer(root, "train", "good", "zzz.png"))
    result = succeeded(
        stage("train_realnet.py", *train_args(demo, str(tmp_path / "run"), data_root=root))
    )
    assert "note: skipped 1 file(s)" in result.stdout and "1 broken link" in result.stdout


# ----------------------------------------------------------------------------------------
# Training needs the training images only
# ----------------------------------------------------------------------------------------


def train_only(demo, tmp_path):
    root = copy_category(demo, tmp_path)
    shutil.rmtree(washer(root, "test"))
    shutil.rmtree(washer(root, "ground_truth"))
    return root


def test_a_train_good_only_data_set_trains_and_evaluate_says_what_is_missing(demo, tmp_path):
    root = train_only(demo, tmp_path)
    out = str(tmp_path / "run")
    succeeded(stage("train_realnet.py", *train_args(demo, out, data_root=root)))
    assert os.path.isfile(os.path.join(out, "model.pt"))
    one_line_error(
        stage(
            "evaluate.py",
            "--checkpoint",
            os.path.join(out, "model.pt"),
            "--throughput-repeats",
            "1",
        ),
        "no test folder",
    )


def test_select_features_accepts_a_train_good_only_data_set(demo, tmp_path):
    root = train_only(demo, tmp_path)
    out = str(tmp_path / "afs")
    succeeded(
        stage(
            "select_features.py",
            "--data",
            root,
            "--category",
            "washer",
            "--dtd",
            demo["dtd"],
            "--backbone-weights",
            "random",
            "--input-size",
            "64",
            "--layers",
            "1",
            "2",
            "--dims",
            "8",
            "16",
            "--batches",
            "1",
            "--batch-size",
            "4",
            "--out",
            out,
        )
    )
    assert os.path.isfile(os.path.join(out, "afs.pt"))


def test_train_diffusion_accepts_a_train_good_only_data_set(demo, tmp_path):
    root = train_only(demo, tmp_path)
    out = str(tmp_path / "diffusion")
    succeeded(
        stage(
            "train_diffusion.py",
            "--data",
            root,
            "--preset",
            "tiny",
            "--image-size",
            "16",
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--sample-steps",
            "2",
            "--sheet-columns",
            "2",
            "--out",
            out,
        )
    )
    assert os.path.isfile(os.path.join(out, "model.pt"))


def test_missing_test_masks_do_not_stop_training_and_are_named_by_evaluate(demo, tmp_path):
    root = copy_category(demo, tmp_path)
    shutil.rmtree(washer(root, "ground_truth"))
    out = str(tmp_path / "run")
    succeeded(stage("train_realnet.py", *train_args(demo, out, data_root=root)))
    one_line_error(
        stage(
            "evaluate.py",
            "--checkpoint",
            os.path.join(out, "model.pt"),
            "--throughput-repeats",
            "1",
        ),
        "has no mask",
    )


def test_the_folder_layout_with_train_good_only_is_recognised(tmp_path):
    from tiny_data import write_image

    write_image(str(tmp_path / "part" / "train" / "good" / "000.png"))
    index = data.open_dataset(str(tmp_path / "part"))
    assert index.format == "folder" and len(index.train("part")) == 1
    with pytest.raises(cli.UserError, match="no test folder"):
        index.test("part")


# ----------------------------------------------------------------------------------------
# Found at the start, not hours in
# ----------------------------------------------------------------------------------------


def sdas_folder(demo, tmp_path, n=3):
    """A folder of SDAS-like images (any images serve as anomaly appearances)."""
    folder = tmp_path / "sdas"
    folder.mkdir()
    texture = data.list_images(
        os.path.join(demo["dtd"], "images", os.listdir(os.path.join(demo["dtd"], "images"))[0])
    )[0]
    for i in range(n):
        Image.open(texture).convert("RGB").resize((64, 64)).save(str(folder / f"sdas_{i}.png"))
    return str(folder)


def test_a_truncated_sdas_image_stops_training_before_the_first_step(demo, tmp_path):
    sdas = sdas_folder(demo, tmp_path)
    cut_in_half(os.path.join(sdas, "sdas_1.png"))
    out = str(tmp_path / "run")
    result = stage("train_realnet.py", *train_args(demo, out, "--sdas", sdas))
    one_line_error(result, "sdas_1.png' is not a readable image", "truncated")
    assert "train step" not in result.stdout and not os.path.exists(os.path.join(out, "model.pt"))


def test_a_truncated_dtd_image_stops_select_features_at_its_start(demo, tmp_path):
    dtd = shutil.copytree(demo["dtd"], str(tmp_path / "dtd"))
    texture = data.list_images(
        os.path.join(dtd, "images", sorted(os.listdir(os.path.join(dtd, "images")))[0])
    )[0]
    cut_in_half(texture)
    out = str(tmp_path / "afs")
    one_line_error(
        stage(
            "select_features.py",
            "--data",
            demo["data"],
            "--category",
            "washer",
            "--dtd",
            dtd,
            "--backbone-weights",
            "random",
            "--input-size",
            "64",
            "--layers",
            "1",
            "2",
            "--dims",
            "8",
            "16",
            "--batches",
            "2",
            "--batch-size",
            "4",
            "--out",
            out,
        ),
        os.path.basename(texture),
        "truncated",
    )
    assert not os.path.exists(os.path.join(out, "afs.pt"))


def test_a_truncated_training_image_stops_training_at_its_start(demo, tmp_path):
    root = copy_category(demo, tmp_path)
    cut_in_half(washer(root, "train", "good", "003.png"))
    out = str(tmp_path / "run")
    one_line_error(
        stage("train_realnet.py", *train_args(demo, out, data_root=root)),
        "003.png' is not a readable image",
    )
    assert not os.path.exists(os.path.join(out, "model.pt"))


# ----------------------------------------------------------------------------------------
# Errors raised in loader workers: the original line (default --workers)
# ----------------------------------------------------------------------------------------


class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise cli.UserError(f"image 'x{i}.png' is not a readable image (OSError: cut)")


def test_a_user_error_in_a_loader_worker_comes_back_as_its_own_line():
    loader = torch.utils.data.DataLoader(_Broken(), num_workers=2)
    with pytest.raises(cli.UserError) as caught:
        next(iter(loader))
    assert "Original Traceback" in str(caught.value)  # torch's wrapper...
    line = cli.worker_error_line(caught.value)
    assert line.startswith("image 'x") and line.endswith("is not a readable image (OSError: cut)")
    assert cli.worker_error_line("plain message") == "plain message"


def test_evaluate_with_a_truncated_test_image_is_one_line_with_default_workers(
    demo, trained, tmp_path
):
    root = copy_category(demo, tmp_path)
    cut_in_half(washer(root, "test", "good", "001.png"))
    out = str(tmp_path / "eval")
    one_line_error(
        process(
            "evaluate.py",
            "--checkpoint",
            os.path.join(trained, "model.pt"),
            "--data",
            root,
            "--out",
            out,
            "--throughput-repeats",
            "1",
        ),
        "001.png' is not a readable image",
    )
    assert not os.path.exists(os.path.join(out, "metrics.json"))


# ----------------------------------------------------------------------------------------
# Flags: refused in one line before any work or file
# ----------------------------------------------------------------------------------------

TRAIN_FLAGS = {
    "--save-every 0": (["--save-every", "0"], "--save-every must be >= 1"),
    "--val-every 0": (["--val-every", "0"], "--val-every must be >= 1"),
    "--log-every 0": (["--log-every", "0"], "--log-every must be >= 1"),
    "--workers -1": (["--workers", "-1"], "--workers must be >= 0"),
    "--dump -1": (["--dump", "-1"], "--dump must be >= 0"),
    "--val-fraction 1": (["--val-fraction", "1"], "--val-fraction must be in [0, 1)"),
    "--val-fraction -0.2": (["--val-fraction", "-0.2"], "--val-fraction must be in [0, 1)"),
    "--normal-ratio 1": (["--normal-ratio", "1"], "--normal-ratio must be in [0, 1)"),
    "--retention 2": (["--retention", "2"], "--retention must be in [0, 1]"),
    "--width-ratio 0": (["--width-ratio", "0"], "--width-ratio must be a finite number > 0"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_FLAGS))
def test_train_realnet_refuses_a_bad_flag_before_writing(demo, tmp_path, case):
    flags, expected = TRAIN_FLAGS[case]
    out = str(tmp_path / "run")
    # the flag last: it overrides train_args' own --log-every
    one_line_error(stage("train_realnet.py", *train_args(demo, out), *flags), expected)
    assert not os.path.exists(out)


def test_train_realnet_bad_flag_as_a_process_is_one_line(demo, tmp_path):
    out = str(tmp_path / "run")
    one_line_error(
        process("train_realnet.py", *train_args(demo, out), "--save-every", "0"),
        "--save-every must be >= 1",
    )
    assert not os.path.exists(out)


def test_log_every_0_with_resume_keeps_a_finished_runs_files(demo, trained):
    before = snapshot(trained)
    one_line_error(
        stage("train_realnet.py", *train_args(demo, trained), "--resume", "--log-every", "0"),
        "--log-every must be >= 1",
    )
    assert snapshot(trained) == before


OTHER_FLAGS = {  # case: (script, flags, expected)
    "train_diffusion --workers -1": (
        "train_diffusion.py",
        ["--workers", "-1"],
        "--workers must be >= 0",
    ),
    "train_diffusion --sample-every -1": (
        "train_diffusion.py",
        ["--sample-every", "-1"],
        "--sample-every must be >= 0",
    ),
    "select_features --workers -1": (
        "select_features.py",
        ["--workers", "-1", "--category", "washer"],
        "--workers must be >= 0",
    ),
    "synthesize --sheet-count -1": (
        "synthesize.py",
        ["--sheet-count", "-1"],
        "--sheet-count must be >= 0",
    ),
    "evaluate --workers -1": ("evaluate.py", ["--workers", "-1"], "--workers must be >= 0"),
    "evaluate --panels -2": ("evaluate.py", ["--panels", "-2"], "--panels must be -1"),
}


@pytest.mark.parametrize("case", sorted(OTHER_FLAGS))
def test_every_stage_refuses_a_negative_count_before_writing(demo, trained, tmp_path, case):
    script, flags, expected = OTHER_FLAGS[case]
    out = str(tmp_path / "out")
    inputs = {
        "train_diffusion.py": ["--data", demo["data"], "--preset", "tiny"],
        "select_features.py": ["--data", demo["data"], "--dtd", demo["dtd"]],
        "synthesize.py": ["--checkpoint", os.path.join(trained, "model.pt")],
        "evaluate.py": ["--checkpoint", os.path.join(trained, "model.pt")],
    }[script]
    one_line_error(stage(script, *inputs, *flags, "--out", out), expected)
    assert not os.path.exists(out)


def test_too_many_workers_are_capped_with_a_note(demo, trained, tmp_path):
    out = str(tmp_path / "eval")
    result = succeeded(
        stage(
            "evaluate.py",
            "--checkpoint",
            os.path.join(trained, "model.pt"),
            "--workers",
            "100",
            "--out",
            out,
            "--throughput-repeats",
            "1",
            "--panels",
            "0",
        )
    )
    assert "note: --workers 100 capped to" in result.stdout
    assert os.path.isfile(os.path.join(out, "metrics.json"))


# ----------------------------------------------------------------------------------------
# One run per output folder
# ----------------------------------------------------------------------------------------


def hold_folder(folder):
    """Another process that owns `folder` (as a running stage does) until it is killed."""
    code = (
        "import sys, time\nfrom realnet.files import prepare_output_folder\n"
        f"prepare_output_folder({folder!r})\nprint('ready', flush=True)\ntime.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "ready"
    return holder


def test_a_second_run_into_a_busy_out_is_refused_and_a_killed_run_frees_it(
    demo, trained, tmp_path
):
    out = str(tmp_path / "run")
    shutil.copytree(trained, out)
    before = snapshot(out)
    holder = hold_folder(out)
    try:
        one_line_error(
            stage("train_realnet.py", *train_args(demo, out), "--resume", "--steps", "3"),
            "is in use by another running process",
        )
        assert snapshot(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed run: the kernel releases its lock
        holder.wait()
    succeeded(stage("train_realnet.py", *train_args(demo, out), "--resume", "--steps", "3"))
    assert torch.load(os.path.join(out, "model.pt"), weights_only=True)["step"] == 3


def test_evaluate_into_a_busy_out_is_refused(trained, tmp_path):
    out = str(tmp_path / "eval")
    holder = hold_folder(out)
    try:
        one_line_error(
            stage("evaluate.py", "--checkpoint", os.path.join(trained, "model.pt"), "--out", out),
            "is in use by another running process",
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not os.path.exists(os.path.join(out, "metrics.json"))


# ----------------------------------------------------------------------------------------
# Words that do not mislead
# ----------------------------------------------------------------------------------------


def test_a_random_bytes_checkpoint_gets_no_advice_to_switch_off_the_protection(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    line = one_line_error(
        stage("evaluate.py", "--checkpoint", str(path)), "is not a readable torch checkpoint"
    )
    assert "weights_only" not in line


def test_a_random_bytes_afs_file_gets_no_advice_to_switch_off_the_protection(demo, tmp_path):
    path = tmp_path / "afs.pt"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    line = one_line_error(
        stage("train_realnet.py", "--afs", str(path), "--out", str(tmp_path / "run")),
        "is not a readable torch checkpoint",
    )
    assert "weights_only" not in line


def test_an_exported_program_given_as_checkpoint_is_named_so(tmp_path):
    class Double(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    path = str(tmp_path / "model.pt2")
    torch.export.save(torch.export.export(Double(), (torch.ones(2),)), path)
    line = one_line_error(stage("evaluate.py", "--checkpoint", path), "an exported program")
    assert "corrupted" not in line


def test_a_file_where_a_folder_is_expected_and_the_reverse_are_named_so(demo, trained, tmp_path):
    picture = os.path.join(demo["data"], "washer", "train", "good", "000.png")
    model = os.path.join(trained, "model.pt")
    out = str(tmp_path / "out")
    one_line_error(
        stage("train_realnet.py", *train_args(demo, out), "--data", picture),
        "data set: '",
        "000.png' is a file, expected a folder",
    )
    one_line_error(
        stage("train_realnet.py", *train_args(demo, out), "--dtd", picture),
        "--dtd: '",
        "is a file, expected a folder",
    )
    one_line_error(
        stage("evaluate.py", "--checkpoint", model, "--predict", picture, "--out", out),
        "--predict: '",
        "is a file, expected a folder",
    )
    one_line_error(
        stage("evaluate.py", "--checkpoint", trained, "--out", out),
        "--checkpoint: '",
        "is a folder, expected a file",
    )
    assert set(snapshot(out)) <= {".lock"}  # nothing written (evaluate takes --out first)
