"""train_diffusion.py and synthesize.py end to end on a toy data set (16 px, tiny UNet)."""

import functools
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import stages
from realnet import distributed, runs
from realnet.files import LOCK_FILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--preset",
    "tiny",
    "--image-size",
    "16",
    "--workers",
    "0",
    "--sample-steps",
    "4",
    "--sheet-columns",
    "4",
]


# one way to run a stage (tests/stages.py): main(argv) in this process, or a real process
run = functools.partial(stages.run, in_process=True)
run_process = functools.partial(stages.run, check=False)
assert_one_line_error = functools.partial(stages.one_line_error, alone=True)


def make_toy_dataset(root, categories=("disc", "square"), n=8, size=24):
    """An MVTec-like tree: a coloured disc / square on a dark, slightly noisy background."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for c, category in enumerate(categories):
        for split, count in (("train/good", n), ("test/good", 1)):
            folder = os.path.join(root, category, split)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                image = (20 + rng.integers(0, 12, (size, size, 3))).astype(np.uint8)
                cy, cx = size // 2 + rng.integers(-2, 3, 2)
                inside = (
                    ((yy - cy) ** 2 + (xx - cx) ** 2 < (size // 3) ** 2)
                    if c % 2 == 0
                    else ((abs(yy - cy) < size // 4) & (abs(xx - cx) < size // 4))
                )
                image[inside] = (230, 180, 40) if c % 2 == 0 else (40, 160, 230)
                Image.fromarray(image).save(os.path.join(folder, f"{i:03d}.png"))
    return str(root)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """A short run (its weights are not meant to be good, only to exist)."""
    out = str(tmp_path_factory.mktemp("diffusion"))
    run(
        "train_diffusion.py",
        "--data",
        toy,
        "--out",
        out,
        "--steps",
        2,
        "--batch-size",
        4,
        "--log-every",
        1,
        *TINY,
    )
    return out


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------- train_diffusion.py
def test_checkpoint_holds_everything_synthesis_needs(trained, toy):
    ckpt = load(os.path.join(trained, "model.pt"))
    assert ckpt["kind"] == "diffusion" and ckpt["classes"] == ["disc", "square"]
    assert ckpt["arch"]["preset"] == "tiny" and ckpt["arch"]["kwargs"]["num_classes"] == 2
    assert ckpt["arch"]["kwargs"]["image_size"] == 16 and ckpt["image_size"] == 16
    assert ckpt["schedule"] == {
        "kind": "linear",
        "num_timesteps": 1000,
        "beta_start": 1e-4,
        "beta_end": 0.02,
    }
    assert ckpt["step"] == 2
    # round trip: the architecture rebuilds the net and the EMA weights load strictly
    from realnet import adm

    model = adm.build_unet(ckpt["arch"])
    model.load_state_dict(ckpt["ema"])
    state = load(os.path.join(trained, "state.pt"))
    assert state["kind"] == "diffusion_train_state" and state["step"] == 2
    assert set(state) >= {"model", "ema", "optimizer", "rng", "args", "config"}
    # EMA differs from the raw weights after 2 updates with warm-up (decay 1/10, 2/11)
    assert any(not torch.equal(state["model"][k], state["ema"][k]) for k in state["model"])
    sheets = os.listdir(os.path.join(trained, "samples"))
    assert sheets == ["step_0000002.png"]
    with Image.open(os.path.join(trained, "samples", sheets[0])) as sheet:
        assert sheet.width >= 4 * 96  # 4 columns of 16 px images, enlarged to 96 px
    log = runs.read_log(os.path.join(trained, "loss.jsonl"))
    assert [r["step"] for r in log] == [1, 2]


def test_training_loss_falls(toy, tmp_path):
    out = str(tmp_path / "run")
    run(
        "train_diffusion.py",
        "--data",
        toy,
        "--categories",
        "disc",
        "--out",
        out,
        "--steps",
        40,
        "--batch-size",
        8,
        "--lr",
        "2e-3",
        "--log-every",
        10,
        "--sample-every",
        0,
        "--save-every",
        1000,
        *TINY,
    )
    log = runs.read_log(os.path.join(out, "loss.jsonl"))
    losses = [r["loss"] for r in log]
    assert len(losses) == 4
    assert losses[-1] < 0.6 * losses[0], losses  # starts near 1 (eps-MSE of a zero output)


def test_resume_gives_the_same_result_as_an_uninterrupted_run(toy, tmp_path):
    common = [
        "--data",
        toy,
        "--batch-size",
        4,
        "--accumulate",
        2,
        "--lr",
        "1e-3",
        "--log-every",
        1,
        "--sample-every",
        0,
        "--save-every",
        2,
        *TINY,
    ]
    run("train_diffusion.py", "--out", tmp_path / "straight", "--steps", 4, *common)
    run("train_diffusion.py", "--out", tmp_path / "resumed", "--steps", 2, *common)
    orphan = tmp_path / "resumed" / ".model.pt.k3j_x9q2.tmp"  # what a kill during a save leaves
    orphan.write_bytes(b"\0" * 1000)
    proc = run(
        "train_diffusion.py", "--out", tmp_path / "resumed", "--steps", 4, "--resume", *common
    )
    assert "resumed" in proc.stdout
    assert not orphan.exists() and "removed 1 temporary file(s)" in proc.stdout
    a = load(tmp_path / "straight" / "state.pt")
    b = load(tmp_path / "resumed" / "state.pt")
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    la = runs.read_log(tmp_path / "straight" / "loss.jsonl")
    lb = runs.read_log(tmp_path / "resumed" / "loss.jsonl")
    assert [r["step"] for r in la] == [1, 2, 3, 4] and la == lb


RESUME_DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", RESUME_DEVICES)
def test_resume_restores_every_tensor_on_the_models_device(tmp_path, device):
    """On an H100 a resumed run crashed in Adam (moments on the CPU, weights on cuda:0).
    Without a GPU, 'meta' stands in for CUDA: the same code path, the same placement."""
    import train_diffusion
    from realnet import adm

    args = train_diffusion.parse_args(["--data", "unused", "--out", str(tmp_path), *TINY])
    quiet = lambda *a, **k: None
    cpu = distributed.DistInfo(device=torch.device("cpu"))
    _, model, _, ema, optimizer, _ = train_diffusion.build_model(args, ["a", "b"], cpu, quiet)
    model(
        torch.randn(2, 3, 16, 16), torch.tensor([3, 7]), torch.tensor([0, 1])
    ).square().mean().backward()
    optimizer.step()
    settings = train_diffusion.resume_settings(args)
    adm.save_checkpoints(str(tmp_path), 1, model, ema, optimizer, settings, {})
    args.resume = True
    target = distributed.DistInfo(device=torch.device(device))
    _, model, net, ema, optimizer, step = train_diffusion.build_model(
        args, ["a", "b"], target, quiet
    )
    assert step == 1 and net is model
    assert runs.misplaced_tensors(model, optimizer) == []
    moments = [v for entry in optimizer.state.values() for v in entry.values() if v.dim() > 0]
    assert len(moments) == 2 * len(list(model.parameters()))
    restored = moments + list(model.state_dict().values()) + list(ema.state_dict().values())
    assert all(v.device.type == device for v in restored)


def test_training_refuses_other_configuration_and_existing_runs(trained, toy):
    proc = run(
        "train_diffusion.py",
        "--data",
        toy,
        "--out",
        trained,
        "--steps",
        4,
        "--batch-size",
        4,
        "--lr",
        "5e-4",
        "--resume",
        *TINY,
        check=False,
    )
    assert_one_line_error(proc, "another configuration", "--lr")
    proc = run(
        "train_diffusion.py",
        "--data",
        toy,
        "--out",
        trained,
        "--steps",
        4,
        "--batch-size",
        4,
        *TINY,
        check=False,
    )
    assert_one_line_error(proc, "already holds a training run", "--resume")


def test_training_bad_inputs_are_one_line_errors(toy, tmp_path):
    proc = run_process(
        "train_diffusion.py",
        "--data",
        toy,
        "--out",
        tmp_path / "x",
        "--init-weights",
        tmp_path / "256x256_diffusion.pt",
        *TINY,
    )
    assert_one_line_error(proc, "256x256_diffusion.pt", "download")
    proc = run(
        "train_diffusion.py",
        "--data",
        tmp_path / "nowhere",
        "--out",
        tmp_path / "x",
        *TINY,
        check=False,
    )
    assert_one_line_error(proc, "nowhere")
    proc = run(
        "train_diffusion.py",
        "--data",
        toy,
        "--categories",
        "nope",
        "--out",
        tmp_path / "x",
        *TINY,
        check=False,
    )
    assert_one_line_error(proc, "nope", "disc")
    proc = run(
        "train_diffusion.py",
        "--data",
        toy,
        "--out",
        tmp_path / "x",
        "--preset",
        "tiny",
        "--image-size",
        "20",
        check=False,
    )
    assert_one_line_error(proc, "--image-size 20")
    for flag, value in (("--lr", "nan"), ("--lr", "0"), ("--grad-clip", "-1")):
        proc = run(
            "train_diffusion.py",
            "--data",
            toy,
            "--out",
            tmp_path / "x",
            flag,
            value,
            *TINY,
            check=False,
        )
        assert_one_line_error(proc, f"{flag} must be a finite number > 0 (got {float(value)})")
    (tmp_path / "a_file").write_text("mine")
    proc = run_process("train_diffusion.py", "--data", toy, "--out", tmp_path / "a_file", *TINY)
    assert_one_line_error(proc, "--out", "a_file' is a file, expected a folder")
    assert (tmp_path / "a_file").read_text() == "mine"


def test_init_weights_from_a_checkpoint_reports_what_did_not_load(trained, toy, tmp_path):
    proc = run(
        "train_diffusion.py",
        "--data",
        toy,
        "--categories",
        "disc",
        "--out",
        tmp_path / "ft",
        "--steps",
        1,
        "--batch-size",
        2,
        "--sample-every",
        0,
        "--init-weights",
        os.path.join(trained, "model.pt"),
        *TINY,
    )
    assert (
        "label_emb.weight (2, 128) (model: (1, 128))" in proc.stdout
    )  # 2-class embedding into a 1-class model


# ----------------------------------------------------------------------------- synthesize.py
def test_synthesize_writes_images_manifest_and_sheet(trained, tmp_path):
    out = tmp_path / "sdas"
    proc = run(
        "synthesize.py",
        "--checkpoint",
        os.path.join(trained, "model.pt"),
        "--category",
        "square",
        "--count",
        5,
        "--batch-size",
        2,
        "--steps",
        5,
        "--out",
        out,
        "--seed",
        3,
    )
    names = sorted(set(os.listdir(out)) - {LOCK_FILE})  # the lock file: one run per folder
    assert names == ["manifest.json", "preview"] + [
        f"square_{i:05d}.png" for i in range(5)
    ]  # only samples are PNGs here
    with Image.open(out / "preview" / "contact_sheet.png") as sheet:
        assert sheet.width > 5 * 96
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["settings"]["steps"] == 5 and manifest["settings"]["sampler"] == "ancestral"
    assert manifest["settings"]["class_id"] == 1 and manifest["settings"]["seed"] == 3
    from realnet.files import file_digest

    assert manifest["settings"]["checkpoint_digest"] == file_digest(
        os.path.join(trained, "model.pt")
    )
    strengths = [r["strength"] for r in manifest["images"]]
    assert (
        len(strengths) == 5
        and all(0.1 <= s <= 0.2 for s in strengths)
        and len(set(strengths)) == 5
    )
    with Image.open(out / "square_00000.png") as im:
        assert im.size == (16, 16) and im.mode == "RGB"
    assert "done" in proc.stdout


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im).astype(int)


def test_synthesize_is_seeded_per_image_and_resumable(trained, tmp_path):
    ckpt = os.path.join(trained, "model.pt")
    common = ["--checkpoint", ckpt, "--category", "disc", "--steps", 4]
    run("synthesize.py", *common, "--count", 4, "--batch-size", 4, "--out", tmp_path / "a")
    run("synthesize.py", *common, "--count", 4, "--batch-size", 1, "--out", tmp_path / "b")
    for i in range(4):  # the batch size does not change the images (up to float rounding)
        assert (
            np.abs(
                pixels(tmp_path / "a" / f"disc_{i:05d}.png")
                - pixels(tmp_path / "b" / f"disc_{i:05d}.png")
            ).max()
            <= 1
        )
    before = pixels(tmp_path / "a" / "disc_00002.png")
    os.unlink(tmp_path / "a" / "disc_00002.png")
    proc = run("synthesize.py", *common, "--count", 4, "--batch-size", 4, "--out", tmp_path / "a")
    assert "3 already there" in proc.stdout and "1 to make" in proc.stdout
    assert np.abs(pixels(tmp_path / "a" / "disc_00002.png") - before).max() <= 1
    m = json.load(open(tmp_path / "a" / "manifest.json"))
    assert [r["index"] for r in m["images"]] == [0, 1, 2, 3]
    # strength 0 (normal images) and the DDIM variant run; s differs per image only when A < B
    run("synthesize.py", *common, "--count", 2, "--strength", 0, 0, "--out", tmp_path / "normal")
    assert {
        r["strength"] for r in json.load(open(tmp_path / "normal" / "manifest.json"))["images"]
    } == {0.0}
    run(
        "synthesize.py",
        *common,
        "--count",
        2,
        "--sampler",
        "ddim",
        "--strength",
        0.01,
        0.03,
        "--out",
        tmp_path / "ddim",
    )
    # settings changed for an existing folder: refused
    proc = run(
        "synthesize.py",
        *common,
        "--count",
        4,
        "--strength",
        0.2,
        0.3,
        "--out",
        tmp_path / "a",
        check=False,
    )
    assert_one_line_error(proc, "other settings", "strength")


def test_synthesize_bad_inputs_are_one_line_errors(trained, tmp_path):
    ckpt = os.path.join(trained, "model.pt")
    proc = run_process(
        "synthesize.py", "--checkpoint", ckpt, "--category", "bottle"
    )  # a real process: exit 2, one line
    assert_one_line_error(proc, "'bottle'", "disc, square")
    proc = run("synthesize.py", "--checkpoint", ckpt, check=False)
    assert_one_line_error(proc, "--category", "disc, square")
    proc = run(
        "synthesize.py",
        "--checkpoint",
        ckpt,
        "--category",
        "disc",
        "--strength",
        -0.1,
        0.2,
        check=False,
    )
    assert_one_line_error(proc, "--strength", ">= 0")
    proc = run(
        "synthesize.py", "--checkpoint", tmp_path / "missing.pt", "--category", "disc", check=False
    )
    assert_one_line_error(proc, "missing.pt", "does not exist")
    proc = run(
        "synthesize.py",
        "--checkpoint",
        os.path.join(trained, "state.pt"),
        "--category",
        "disc",
        check=False,
    )
    assert_one_line_error(proc, "state.pt", "expected a diffusion checkpoint")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 10)
    proc = run("synthesize.py", "--checkpoint", garbage, "--category", "disc", check=False)
    assert_one_line_error(proc, "garbage.pt", "not a readable")
    proc = run(
        "synthesize.py", "--checkpoint", ckpt, "--category", "disc", "--eta", 0.5, check=False
    )
    assert_one_line_error(proc, "--eta 0.5 has no effect with --sampler ancestral")
    proc = run_process("synthesize.py", "--checkpoint", ckpt, "--category", "disc", "--out", ckpt)
    assert_one_line_error(proc, "--out", "model.pt' is a file, expected a folder")


def test_synthesize_remakes_an_empty_image_and_removes_orphaned_temporaries(trained, tmp_path):
    common = [
        "--checkpoint",
        os.path.join(trained, "model.pt"),
        "--category",
        "disc",
        "--steps",
        2,
        "--count",
        3,
        "--out",
        tmp_path,
    ]
    run("synthesize.py", *common)
    good = pixels(tmp_path / "disc_00001.png")
    (tmp_path / "disc_00001.png").write_bytes(b"")  # a zero-byte PNG
    (tmp_path / ".disc_00002.png.a1b2c3d4.tmp").write_bytes(b"\0")  # a killed save
    proc = run("synthesize.py", *common)
    assert "1 unreadable image(s)" in proc.stdout and "1 to make" in proc.stdout
    assert np.abs(pixels(tmp_path / "disc_00001.png") - good).max() <= 1
    assert not (tmp_path / ".disc_00002.png.a1b2c3d4.tmp").exists()


def test_synthesize_in_bf16_is_close_to_fp32_and_kept_apart(trained, tmp_path):
    """--precision bf16 autocasts the diffusion UNet; the sampler's own arithmetic (means,
    variances, noise) stays float32, so the images differ from fp32's by the rounding of the
    network's output only, amplified along the chain: a few grey levels on average (the toy
    model's output is small, so here often none; on the demo's model 0.5-0.8 on average)."""
    from realnet import adm, precision

    ckpt = load(os.path.join(trained, "model.pt"))
    net = adm.build_unet(ckpt["arch"])
    net.load_state_dict(ckpt["ema"])
    net.eval()
    x = torch.randn(
        2, 3, ckpt["image_size"], ckpt["image_size"], generator=torch.Generator().manual_seed(0)
    )
    t, y = torch.tensor([10, 500]), torch.tensor([0, 1])
    with torch.no_grad():
        full = net(x, t, y).float()
        with precision.autocast("bf16", torch.device("cpu")):
            half = net(x, t, y).float()
    error = (half - full).norm() / full.norm()
    assert 0 < error < 0.05, error  # bf16 ran (not bit-identical), within a few of its ulps
    common = [
        "--checkpoint",
        os.path.join(trained, "model.pt"),
        "--category",
        "disc",
        "--steps",
        4,
        "--count",
        2,
    ]
    run("synthesize.py", *common, "--out", tmp_path / "fp32")
    run("synthesize.py", *common, "--precision", "bf16", "--out", tmp_path / "bf16")
    for i in range(2):
        difference = np.abs(
            pixels(tmp_path / "fp32" / f"disc_{i:05d}.png")
            - pixels(tmp_path / "bf16" / f"disc_{i:05d}.png")
        )
        assert difference.mean() < 8, difference.mean()  # of 255 grey levels
    manifest = json.load(open(tmp_path / "bf16" / "manifest.json"))
    assert manifest["settings"]["precision"] == "bf16"
    # a folder made in one precision is not completed in another
    proc = run("synthesize.py", *common, "--count", 3, "--out", tmp_path / "bf16", check=False)
    assert_one_line_error(proc, "other settings", "precision")
    proc = run(
        "synthesize.py",
        *common,
        "--precision",
        "fp16",
        "--device",
        "cpu",
        "--out",
        tmp_path / "fp16",
        check=False,
    )
    assert_one_line_error(proc, "--precision fp16", "CUDA")
