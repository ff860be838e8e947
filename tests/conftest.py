"""Shared test set-up."""

import pytest

from demo_data import make_demo_dataset, make_demo_textures
from realnet.files import release_output_folders
from tiny_data import SIZE, random_backbone_identity, write_afs, write_image


@pytest.fixture(autouse=True)
def _release_output_folders():
    """A stage's main() called in the test process owns its --out until the process ends
    (realnet/files.py); the next test, or a stage started as a subprocess, may use it."""
    yield
    release_output_folders()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny demo data set (tablet, washer at 64 px), DTD textures and an AFS file on the
    random backbone: what the stage tests train and evaluate on."""
    root = tmp_path_factory.mktemp("demo")
    data = make_demo_dataset(
        str(root / "data"),
        categories=["tablet", "washer"],
        image_size=SIZE,
        n_train=8,
        n_test_good=3,
        n_test_defect=4,
    )
    dtd = make_demo_textures(str(root / "dtd"), n=1)
    identity = random_backbone_identity()
    afs = write_afs(str(root / "afs.pt"), backbone=identity)
    return {"root": root, "data": data, "dtd": dtd, "afs": afs, "identity": identity}


@pytest.fixture(scope="module")
def anomaly_sources(tmp_path_factory):
    """One tiny demo category (washer), DTD textures and three SDAS-like images: what the
    anomaly synthesis and the training stream draw from."""
    root = tmp_path_factory.mktemp("anomaly")
    make_demo_dataset(
        str(root / "demo"),
        categories=["washer"],
        image_size=SIZE,
        n_train=5,
        n_test_good=1,
        n_test_defect=1,
    )
    make_demo_textures(str(root / "dtd"), n=2)
    sdas = root / "sdas"
    for i in range(3):
        write_image(str(sdas / f"{i:05d}.png"), size=(SIZE, SIZE), seed=i)
    (sdas / "manifest.json").write_text("{}")  # synthesize.py's manifest: not an image, ignored
    return {"data": str(root / "demo"), "dtd": str(root / "dtd"), "sdas": str(sdas)}
