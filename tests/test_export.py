"""realnet/export.py through evaluate.py --export: the whole model (uint8 images of any size
-> score, map at the input's size, OK/NG) as two torch.export programs, equal to --predict
on the same images; loadable with torch alone (reference variant) or with the compiled
library alone (fused variant); one line for a missing library or a wrong input."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from deploy_model import scores_and_maps, write_checkpoint
from realnet import data, export, ops
from test_invariance import SIZE
from stages import ENV, REPO, one_line_error, run
from tiny_data import write_image

# Three input sizes: the model's own, a tall one (Pillow 13 resizes it vertical pass
# first), a larger, not square one twice; all resized by PIL exactly as the program does
# (see test_the_resize_is_pils)
SIZES = {
    "square.png": (SIZE, SIZE),
    "tall.png": (SIZE + 5, 3 * SIZE),
    "wide.png": (97, 75),
    "wide_too.png": (97, 75),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    folder = root / "images"
    paths = [
        write_image(str(folder / name), size=size, seed=i)
        for i, (name, size) in enumerate(SIZES.items())
    ]
    checkpoint = str(root / "run" / "model.pt")
    model, features = write_checkpoint(checkpoint, paths)
    path = str(root / "deploy" / "model.pt2")
    result = run(
        "evaluate.py", "--checkpoint", checkpoint, "--export", path, "--predict", str(folder)
    )
    stored = torch.load(checkpoint, weights_only=False)["calibration"]
    return {
        "root": root,
        "paths": paths,
        "path": path,
        "model": model,
        "features": features,
        "stdout": result.stdout,
        "threshold": stored,
        "report": json.load(open(export.description_path(path))),
    }


def test_the_description_sits_beside_the_programs_and_says_what_each_needs(exported):
    report = exported["report"]
    folder = os.path.dirname(exported["path"])
    expected = {"model.export.json", "model.reference.pt2"} | (
        {"model.pt2"} if ops.HAS_EXTENSION else set()
    )
    assert set(os.listdir(folder)) == expected
    assert report["image_threshold"] == exported["threshold"]["image"]
    assert report["programs"]["reference"]["needs"].startswith("torch only")
    assert report["programs"]["reference"]["realnet_ops_in_graph"] == []
    if ops.HAS_EXTENSION:
        assert report["programs"]["fused"]["realnet_ops_in_graph"] == [
            "rrs_gather",
            "rrs_rank",
            "rrs_stats",
        ]
        assert "load_library" in report["programs"]["fused"]["needs"]
    for program in report["programs"].values():  # evaluate.py's own check, on every image
        check = program["vs_predict"]
        assert check["images"] == len(SIZES) and check["verdicts_equal"] is True
        assert check["max_difference"]["score_relative"] <= 1e-5
    assert report["resize_max_abs_difference_vs_pil"] == 0
    assert "verdicts equal" in exported["stdout"]


@pytest.mark.parametrize("variant", ["fused", "reference"])
def test_the_program_scores_and_decides_as_predict_does(exported, variant):
    if variant == "fused" and not ops.HAS_EXTENSION:
        pytest.skip("needs the compiled extension")
    path = exported["path"] if variant == "fused" else export.reference_path(exported["path"])
    program = export.load(path)
    expected, maps = scores_and_maps(exported["model"], exported["features"], exported["paths"])
    threshold = np.float32(exported["threshold"]["image"])
    assert (expected >= threshold).any() and (expected < threshold).any()  # both verdicts
    for path_i, score, anomaly_map in zip(exported["paths"], expected, maps):
        image = torch.from_numpy(data.load_image(path_i))[None]  # a batch of one, own size
        out = export.run(program, image)
        height, width = image.shape[1:3]
        assert out["anomaly_map"].shape == (1, height, width)
        assert float(out["score"][0]) == pytest.approx(float(score), rel=1e-5)
        assert bool(out["ng"][0]) == bool(score >= threshold)
        # the map at the image's size is --predict's map resized as its masks are made
        resized = Image.fromarray(anomaly_map, mode="F")
        if resized.size != (width, height):
            resized = resized.resize((width, height), Image.BILINEAR)
        assert np.abs(out["anomaly_map"][0].numpy() - np.asarray(resized)).max() <= 1e-5
    same_size = torch.stack([torch.from_numpy(data.load_image(p)) for p in exported["paths"][2:]])
    together = export.run(program, same_size)["score"]  # a batch of two
    assert torch.allclose(together, torch.from_numpy(expected[2:]), rtol=1e-5, atol=0)


PLAIN_LOAD = """
import sys, numpy as np, torch
from PIL import Image
{library}
out = torch.export.load({path!r}).module()(
    torch.from_numpy(np.asarray(Image.open({image!r}).convert("RGB")))[None])
assert not any(name.startswith("realnet") for name in sys.modules), "imported the repository"
print("score", float(out["score"][0].detach()))
"""


@pytest.mark.parametrize("variant", ["fused", "reference"])
def test_each_program_loads_without_this_repositorys_python_code(exported, variant, tmp_path):
    if variant == "fused":
        if not ops.HAS_EXTENSION:
            pytest.skip("needs the compiled extension")
        library, path = f"torch.ops.load_library({ops._C.__file__!r})", exported["path"]
    else:
        library, path = "", export.reference_path(exported["path"])
    code = PLAIN_LOAD.format(library=library, path=path, image=exported["paths"][1])
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    expected, _ = scores_and_maps(exported["model"], exported["features"], exported["paths"][1:2])
    score = float(result.stdout.split("score")[1])
    assert score == pytest.approx(float(expected[0]), rel=1e-5)


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="needs the compiled extension")
def test_the_fused_program_without_the_library_gets_one_line(exported):
    code = (
        f"import sys; sys.modules['realnet._C'] = None; sys.path.insert(0, {REPO!r})\n"
        "from realnet import cli, export\n"
        f"cli.run(lambda: export.load({exported['path']!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = one_line_error(result)
    assert "torch.ops.realnet.rrs_gather" in line and "load_library" in line
    assert "model.reference.pt2" in line


def test_a_wrong_input_gets_one_line(exported):
    program = export.load(export.reference_path(exported["path"]))
    image = torch.from_numpy(data.load_image(exported["paths"][0]))[None]
    for wrong, words in (
        (image.float(), "uint8"),
        (image[..., :2], "(batch, height, width, 3)"),
        (image[0], "(batch, height, width, 3)"),
        (image.permute(0, 3, 1, 2), "(batch, height, width, 3)"),
    ):
        with pytest.raises(export.UserError, match=r"the program takes") as error:
            export.run(program, wrong)
        assert words in str(error.value) and "\n" not in str(error.value)


def test_the_resize_is_pils(tmp_path):
    """resize_uint8_like_pil against PIL, exactly: on shapes where Pillow 13 runs its
    vertical pass first (height shrinking by more than twice the width) and where it runs
    the horizontal one first, enlarging, shrinking, one axis unchanged, and random sizes."""
    rng = np.random.default_rng(0)
    shapes = [
        (SIZE, SIZE),
        (97, 75),
        (40, 30),
        (300, 200),
        (1000, 7),
        (65, 63),
        (2, 2),
        (46, 89),
        (70, 178),
        (82, 110),
        (232, 397),
        (SIZE, 300),
        (300, SIZE),
        (7, 1000),
    ]
    shapes += [tuple(int(v) for v in rng.integers(2, 400, 2)) for _ in range(40)]
    for width, height in shapes:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pil = np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.BILINEAR))
        ours = export.resize_uint8_like_pil(
            torch.from_numpy(image).permute(2, 0, 1)[None].double(), SIZE
        )[0]
        assert np.abs(ours.permute(1, 2, 0).numpy() - pil).max() == 0, (width, height)
    # the rule is Pillow 13's: (232, 397) stays horizontal-first, (82, 110) does not
    assert export.pillow_runs_vertical_first() == (int(PIL.__version__.split(".")[0]) >= 13)


def test_bad_export_paths_get_one_line_before_any_work(exported, tmp_path):
    checkpoint = str(exported["root"] / "run" / "model.pt")
    line = one_line_error(
        run("evaluate.py", "--checkpoint", checkpoint, "--export", str(tmp_path), check=False)
    )
    assert "--export" in line and ".pt2" in line
    line = one_line_error(
        run(
            "evaluate.py",
            "--checkpoint",
            checkpoint,
            "--export",
            str(tmp_path / "m.pt2"),
            "--out",
            str(tmp_path),
            check=False,
        )
    )
    assert "--out" in line and "beside" in line


def test_a_file_that_is_not_an_exported_program_is_refused(tmp_path):
    path = tmp_path / "not_a_program.pt2"
    path.write_bytes(b"no zip archive")
    with pytest.raises(export.UserError, match="not_a_program.pt2"):
        export.load(str(path))
