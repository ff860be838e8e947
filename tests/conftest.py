"""Shared test set-up."""
import pytest

from realnet.files import release_output_folders


@pytest.fixture(autouse=True)
def _release_output_folders():
    """A stage's main() called in the test process owns its --out until the process ends
    (realnet/files.py); the next test, or a stage started as a subprocess, may use it."""
    yield
    release_output_folders()
