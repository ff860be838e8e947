"""realnet/files.py: atomic writes never lose the previous file; checked reads fail clearly."""
import os
import stat

import pytest
import torch

from realnet.cli import UserError
from realnet.files import atomic_torch_save, atomic_write_json, atomic_write_text, file_digest, load_checkpoint


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(str(path), {"step": 1})
    with pytest.raises(TypeError):
        atomic_write_json(str(path), {"step": object()})  # fails half-way through serialising
    assert path.read_text().strip().replace(" ", "").replace("\n", "") == '{"step":1}'
    assert os.listdir(tmp_path) == ["state.json"]


def test_written_files_get_the_usual_permissions_not_mkstemp_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(str(tmp_path / "a.txt"), "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o644


def test_load_checkpoint_checks_existence_readability_and_kind(tmp_path):
    good = tmp_path / "model.pt"
    atomic_torch_save({"kind": "realnet", "x": torch.ones(2)}, str(good))
    assert load_checkpoint(str(good), "--checkpoint", kind="realnet")["x"].sum() == 2
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"), "--checkpoint")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable torch checkpoint"):
        load_checkpoint(str(tmp_path / "junk.pt"), "--checkpoint")
    with pytest.raises(UserError, match="is a realnet checkpoint, expected a diffusion checkpoint"):
        load_checkpoint(str(good), "--checkpoint", kind="diffusion")
    assert len(file_digest(str(good))) == 16
