"""The inference model as one torch.export program (evaluate.py --export PATH).

    images (B, 3, S, S), ImageNet-normalised
      -> frozen backbone -> AFS -> reconstruction UNets -> RRS -> discriminator
      -> anomaly maps (B, S, S): in [0, 1], or standard scores with --anomaly-map fused
         (the reconstruction energies and the stored mean and std are part of the graph)

torch.export traces this into a single graph (an ExportedProgram, saved as .pt2) with
the batch size left free. The fused RRS operators stay in it as calls of
torch.ops.realnet.* (rrs_stats, rrs_rank, rrs_gather): their fake kernels
(realnet/ops.py) give the shapes that tracing needs, so no Python fallback is inlined.
Loading the program needs those operators registered, i.e. `import realnet.ops` (or
`load` below) before torch.export.load; nothing else of this repository.

    import torch, realnet.export
    program = realnet.export.load("model.pt2")
    maps = program.module()(images)

The program is exported under torch.no_grad(): the decorators of the backbone and of AFS
then change nothing, and the graph holds no grad-mode switches (they do not serialise).
"""
import io
import time
import warnings

import torch
import torch.nn as nn

from . import ops  # noqa: F401  (registers torch.ops.realnet.* and their fake kernels)
from .cli import UserError
from .files import atomic_write_bytes


class InferenceModel(nn.Module):
    """Backbone, AFS and RealNet as one module: images -> anomaly maps (B, S, S)."""

    def __init__(self, features, model):
        super().__init__()
        self.features, self.model = features, model

    def forward(self, images):
        return self.model(self.features(images), images.shape[-2:])["anomaly_map"]


def export_program(features, model, images):
    """torch.export of the eval-mode inference model, the batch dimension dynamic."""
    inference = InferenceModel(features, model).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        return torch.export.export(inference, (images,), dynamic_shapes=({0: batch},))


def fused_ops_in(program):
    """The realnet operators the program's graph calls, e.g. ['rrs_gather', ...]."""
    return sorted({str(node.target).split(".")[1] for node in program.graph.nodes
                   if node.op == "call_function" and str(node.target).startswith("realnet.")})


def save(program, path):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The backbone's weights are channels-last (backbone.py); torch's archive writer
        # warns about any weight that is not a plain contiguous tensor, although it stores
        # and reloads it exactly (export_and_check compares the reloaded program with the
        # eager model, and evaluate.py's test checks that they agree).
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        torch.export.save(program, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load(path):
    """An exported program written by `save` (the realnet operators are registered here)."""
    try:
        return torch.export.load(path)
    except Exception as e:
        raise UserError(f"{path!r} is not a readable exported program ({type(e).__name__}: {e})"
                        .splitlines()[0])


@torch.no_grad()
def export_and_check(model, features, images, path):
    """Export, save to `path`, load back and compare with the eager model on `images` and
    on its first image alone (another batch size). Returns the report (what export.json holds)."""
    if not ops.HAS_EXTENSION:
        raise UserError("--export: the compiled extension realnet._C is not built, so the "
                        "program would hold the plain-PyTorch RRS (pip install -e . first)")
    started = time.perf_counter()
    program = export_program(features, model, images)
    export_s = time.perf_counter() - started
    save(program, path)
    reloaded = load(path).module()
    eager = InferenceModel(features, model).eval()
    differences = {}
    for batch in (images, images[:1]):
        differences[f"batch of {len(batch)}"] = float((reloaded(batch) - eager(batch)).abs().max())
    found = fused_ops_in(program)
    if "rrs_gather" not in found:
        raise RuntimeError(f"the exported graph lacks the fused RRS operators (found {found})")
    return {"path": path, "fused_ops_in_graph": found, "max_abs_difference": differences,
            "dynamic": "batch dimension (1 to 4096)", "input_shape": list(images.shape[1:]),
            "export_seconds": round(export_s, 2), "device": str(images.device),
            "torch": torch.__version__,
            "load_with": "import realnet.export; realnet.export.load(path).module()(images)"}


def describe(report):
    worst = max(report["max_abs_difference"].values())
    return (f"exported to {report['path']} (ops {', '.join(report['fused_ops_in_graph'])} in the "
            f"graph; batch dynamic); reloaded vs eager: max abs difference {worst:.3g}")
