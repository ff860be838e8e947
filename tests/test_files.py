"""realnet/files.py: atomic writes never lose the previous file; checked reads fail clearly."""

import os
import stat

import numpy as np
import pytest
import torch

from realnet.cli import UserError
from realnet.files import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    file_digest,
    load_checkpoint,
)
from realnet.files import prepare_output_folder


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
    with pytest.raises(
        UserError, match="is a realnet checkpoint, expected a diffusion checkpoint"
    ):
        load_checkpoint(str(good), "--checkpoint", kind="diffusion")
    assert len(file_digest(str(good))) == 16


def test_a_stage_start_removes_the_temporaries_of_a_killed_save_and_nothing_else(tmp_path, capsys):
    (tmp_path / "samples" / "old").mkdir(parents=True)
    (tmp_path / "realnet").mkdir()  # another stage's folder: it may be saving there right now
    orphans = [
        tmp_path / ".model.pt.k3j_x9q2.tmp",
        tmp_path / "samples" / "old" / ".step_02.png.a1b2c3d4.tmp",
        tmp_path / "samples" / ".step_03.png.a1b2c3d4.tmp",
    ]
    kept = [
        tmp_path / "model.pt",
        tmp_path / "notes.tmp",
        tmp_path / ".hidden",
        tmp_path / ".x.tmp",
        tmp_path / "realnet" / ".state.pt.a1b2c3d4.tmp",
    ]
    for path in orphans + kept:
        path.write_bytes(b"x")
    assert prepare_output_folder(str(tmp_path), subfolders=("samples", "absent")) == str(tmp_path)
    assert not any(path.exists() for path in orphans)
    assert all(path.exists() for path in kept)
    assert "removed 3 temporary file(s)" in capsys.readouterr().out


def test_an_output_folder_that_is_a_file_or_not_writable_is_refused(tmp_path):
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(UserError, match=r"^--out '.*taken' is a file, expected a folder"):
        prepare_output_folder(str(tmp_path / "taken"))
    assert (tmp_path / "taken").read_text() == "mine"
    with pytest.raises(UserError, match=r"^--dtd-out '.*taken' is a file"):
        prepare_output_folder(str(tmp_path / "taken"), "--dtd-out")
    if os.path.isdir("/proc/self"):  # not writable, even for root
        with pytest.raises(UserError, match="cannot write there"):
            prepare_output_folder("/proc/self")


class _RunsCode:
    """Unpickling this calls a function: what a checkpoint from a stranger could hold."""

    def __reduce__(self):
        return (os.mkdir, (os.path.join(os.environ["MARKER_DIR"], "code_ran"),))


def test_a_checkpoint_holding_an_object_is_refused_in_one_line_without_running_it(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("MARKER_DIR", str(tmp_path))
    torch.save({"kind": "realnet", "x": _RunsCode()}, str(tmp_path / "model.pt"))
    with pytest.raises(UserError) as error:
        load_checkpoint(str(tmp_path / "model.pt"), "--checkpoint", kind="realnet")
    message = str(error.value)
    assert "\n" not in message and message.startswith("--checkpoint: ")
    assert "holds Python objects (posix.mkdir)" in message and "could run code" in message
    assert not (tmp_path / "code_ran").exists()
    # a numpy array (what older states held for numpy's RNG) is refused the same way
    torch.save({"kind": "realnet", "rng": np.random.get_state()}, str(tmp_path / "old.pt"))
    with pytest.raises(UserError, match="holds Python objects .*numpy"):
        load_checkpoint(str(tmp_path / "old.pt"), "--checkpoint", kind="realnet")


def test_checkpoints_are_written_with_tensors_and_plain_types_only(tmp_path):
    with pytest.raises(TypeError, match=r"state.pt\['rng'\] is a ndarray"):
        atomic_torch_save({"rng": np.zeros(3)}, str(tmp_path / "state.pt"))
    with pytest.raises(TypeError, match=r"state.pt\['f1'\] is a float64"):  # a float subclass
        atomic_torch_save({"f1": np.float64(0.5)}, str(tmp_path / "state.pt"))
    assert os.listdir(tmp_path) == []
    plain = {"a": [1, 2.5, "x", None, True, (3, 4)], 0: {"t": torch.arange(3)}}
    atomic_torch_save(plain, str(tmp_path / "ok.pt"))
    assert load_checkpoint(str(tmp_path / "ok.pt"), "x")["a"] == plain["a"]


def test_a_kind_is_named_with_its_article(tmp_path):
    atomic_torch_save({"kind": "afs"}, str(tmp_path / "afs.pt"))
    with pytest.raises(UserError, match="is an afs checkpoint, expected a realnet checkpoint"):
        load_checkpoint(str(tmp_path / "afs.pt"), "--checkpoint", kind="realnet")


def test_a_folder_where_a_stage_writes_a_file_is_refused_before_the_run(tmp_path):
    (tmp_path / "afs.pt").mkdir()  # left by an earlier run with --out FOLDER/afs.pt
    with pytest.raises(
        UserError, match=r"afs.pt' is a folder, but the stage writes its file afs.pt there"
    ):
        prepare_output_folder(str(tmp_path), files=("afs_scores.png", "afs.pt"))
