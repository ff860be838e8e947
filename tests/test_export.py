"""realnet/export.py: the inference model (backbone to anomaly map) as one torch.export
program, with the fused RRS operators inside, saved, reloaded and equal to the eager
model; and evaluate.py --export (tests/test_predict.py runs it on a trained checkpoint)."""
import pytest
import torch

from realnet import export, ops
from test_invariance import SIZE, images, tiny_model

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="needs the compiled extension")


@pytest.mark.parametrize("anomaly_map", ["discriminator", "fused"])
def test_the_exported_program_holds_the_fused_ops_and_matches_the_eager_model(tmp_path, anomaly_map):
    model, features = tiny_model(anomaly_map)
    batch = images(3, 0)
    path = str(tmp_path / "model.pt2")
    report = export.export_and_check(model, features, batch, path)
    assert report["fused_ops_in_graph"] == ["rrs_gather", "rrs_rank", "rrs_stats"]
    # the same aten kernels on the same inputs: exact on the CPU, here as in the report
    assert report["max_abs_difference"] == {"batch of 3": 0.0, "batch of 1": 0.0}

    program = export.load(path)
    graph = str(program.graph)
    assert "torch.ops.realnet.rrs_gather" in graph and "rrs_select_reference" not in graph
    other = images(5, 1)   # another batch size than the one it was traced with
    with torch.no_grad():
        eager = export.InferenceModel(features, model).eval()(other)
        exported = program.module()(other)
    assert exported.shape == (5, SIZE, SIZE)
    assert torch.equal(exported, eager)


def test_a_file_that_is_not_an_exported_program_is_refused(tmp_path):
    path = tmp_path / "not_a_program.pt2"
    path.write_bytes(b"no zip archive")
    with pytest.raises(export.UserError, match="not_a_program.pt2"):
        export.load(str(path))
