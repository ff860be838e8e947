"""The whole model as one torch.export program (evaluate.py --export PATH), for deployment
outside this repository:

    images (B, H, W, 3) uint8 RGB, channels last (what numpy / PIL decoding gives), any
    H and W (each 2 to 16384) and batch (1 to 1024)
      -> resize to the model's input size S x S: PIL's bilinear filter, reproduced exactly
         (Pillow's coefficients, its 22-bit fixed point, its rounding to uint8 after each
         pass and its order of the passes; antialiased when shrinking), as
         data.load_image does for --predict
      -> ImageNet normalisation -> frozen backbone -> AFS -> reconstruction UNets -> RRS
         -> discriminator -> the anomaly map (S x S) the checkpoint reports (the
         discriminator's probability, or the fused map in calibrated units)
      -> score: max of the pool x pool average-pooled map (stride 1, no padding; pool 16
         by default, metrics.image_scores), computed at S x S as --predict does
      -> the map back at the input's own H x W (PIL's bilinear filter on float32, as
         --predict's masks are made)
      -> ng: score >= the stored image threshold (only when the checkpoint stores one)

    outputs: a dict {"score": (B,) float32, "anomaly_map": (B, H, W) float32,
                     "ng": (B,) bool (True = NG), only with an image threshold}

Two programs are written. PATH (e.g. model.pt2) calls the fused RRS operators
torch.ops.realnet.* (csrc/): loading it needs them registered, i.e. the compiled library of
this repository (realnet/_C*.so), loaded with torch.ops.load_library, nothing else of it.
PATH's reference variant (model.reference.pt2) holds RRS in plain PyTorch
(ops.rrs_select_reference): it loads with torch alone, on machines without the compiled
ops, at some speed cost. Both are described in model.export.json beside them. Loading:

    import torch; torch.ops.load_library("realnet/_C.cpython-311-x86_64-linux-gnu.so")
    out = torch.export.load("model.pt2").module()(images)   # or model.reference.pt2, no line 1

`load` below does the same with one-line errors (the ops missing, a file that is not a
program), and `check_input` gives one line for a wrong input (dtype, rank, channels) before
torch's own check of the program's input specification would raise its longer message.

The programs are exported under torch.no_grad(): the decorators of the backbone and of AFS
then change nothing, and the graph holds no grad-mode switches (they do not serialise).
"""

import contextlib
import io
import json
import os
import re
import time
import warnings
import zipfile

import numpy as np
import PIL
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data, metrics, ops
from .cli import UserError, parse_list
from .files import atomic_write_bytes, atomic_write_text, file_digest
from .predict import list_lot

PIL_PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images (Resample.c: 32 - 8 - 2)
MAX_SIDE, MAX_BATCH = 16384, 1024


# ----------------------------------------------------------------------------------------
# PIL's bilinear resize, in torch, exactly
# ----------------------------------------------------------------------------------------


def pil_bilinear_weights(in_size, out_size, device=None):
    """(out_size, in_size) float64: row o holds the weights Pillow's bilinear filter gives
    the source pixels of output pixel o (Resample.c, precompute_coeffs: support 1 scaled
    by the reduction factor when shrinking, rows normalised to sum 1). in_size may be
    symbolic (torch.export): everything is tensor arithmetic."""
    source = torch.arange(in_size, dtype=torch.float64, device=device)
    target = torch.arange(out_size, dtype=torch.float64, device=device)
    scale = torch.ones((), dtype=torch.float64, device=device) * in_size / out_size
    support = torch.clamp(scale, min=1.0)  # the filter's support (1) times filterscale
    center = (target + 0.5) * scale
    first = torch.clamp(torch.trunc(center - support + 0.5), min=0.0)
    last = torch.minimum(torch.trunc(center + support + 0.5), torch.ones_like(center) * in_size)
    x = ((source[None, :] - center[:, None]) + 0.5) * (1.0 / support)
    weights = torch.clamp(1.0 - x.abs(), min=0.0)
    inside = (source[None, :] >= first[:, None]) & (source[None, :] < last[:, None])
    weights = torch.where(inside, weights, torch.zeros_like(weights))
    total = weights.sum(dim=1, keepdim=True)
    return weights / torch.where(total == 0, torch.ones_like(total), total)


def _fixed_point_pass(pixels, weights):
    """One pass of Pillow's 8-bit resampling along the last dimension: integer weights
    (22-bit fixed point, rounded half up), integer accumulation plus half, shift, clip to
    0..255. In float64 every value here is an integer below 2^31: exact."""
    scale = float(1 << PIL_PRECISION_BITS)
    fixed = torch.trunc(weights * scale + 0.5)
    accumulated = pixels @ fixed.transpose(0, 1) + scale / 2
    return torch.clamp(torch.floor(accumulated / scale), 0.0, 255.0)


def pillow_runs_vertical_first():
    """Pillow 13 made the pass order depend on the shape (Resample.c, ImagingResampleInner:
    vertical first when the height shrinks by more than twice what the width shrinks);
    earlier versions always run the horizontal pass first. The program follows the Pillow
    that --predict uses where it is exported (its version is in the description file)."""
    return int(PIL.__version__.split(".")[0]) >= 13


def resize_uint8_like_pil(images, size, vertical_first_rule=None):
    """(B, C, H, W) integer-valued float64 -> (B, C, size, size), the values PIL's
    Image.resize((size, size), BILINEAR) gives on the uint8 image: one pass per axis, each
    rounded to uint8 as Pillow does, in Pillow's order (pillow_runs_vertical_first). Both
    orders are computed and one is selected with tensor arithmetic, so that an exported
    program keeps the rule for every input size instead of the example's."""
    if vertical_first_rule is None:
        vertical_first_rule = pillow_runs_vertical_first()
    height, width = images.shape[-2:]
    along_width = pil_bilinear_weights(width, size, images.device)
    along_height = pil_bilinear_weights(height, size, images.device)

    def horizontal(x):
        return _fixed_point_pass(x, along_width)

    def vertical(x):
        return _fixed_point_pass(x.transpose(-1, -2), along_height).transpose(-1, -2)

    horizontal_first = vertical(horizontal(images))
    if not vertical_first_rule:
        return horizontal_first
    h = torch.ones((), dtype=torch.float64, device=images.device) * height
    w = torch.ones((), dtype=torch.float64, device=images.device) * width
    shrinks = h - size
    vertical_first = (shrinks > 0) & (shrinks > 2 * (w - size))
    return torch.where(vertical_first, horizontal(vertical(images)), horizontal_first)


def resize_float_like_pil(maps, height, width):
    """(B, S, S) float32 -> (B, height, width) float32 as PIL resizes a mode-F image with
    BILINEAR (double accumulation, float32 after each pass): --predict's mask."""
    size_h, size_w = maps.shape[-2:]
    wide = maps.double() @ pil_bilinear_weights(size_w, width, maps.device).transpose(0, 1)
    tall = pil_bilinear_weights(size_h, height, maps.device) @ wide.float().double()
    return tall.float()


# ----------------------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------------------


class WholeModel(nn.Module):
    """uint8 RGB images (B, H, W, 3) -> {"score", "anomaly_map" at H x W, "ng"}: see the
    module's doc. `pool` 1 scores with the map's plain maximum (--image-score max)."""

    def __init__(self, features, model, pool=16, image_threshold=None):
        super().__init__()
        self.features, self.model, self.pool = features, model, pool
        self.size = model.config["input_size"]
        self.register_buffer("mean", torch.from_numpy(data.IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.from_numpy(data.IMAGENET_STD).view(1, 3, 1, 1))
        self.decides = image_threshold is not None
        self.register_buffer(
            "image_threshold",
            torch.tensor(image_threshold if self.decides else 0.0, dtype=torch.float32),
        )

    def forward(self, images):
        height, width = images.shape[1], images.shape[2]
        pixels = images.permute(0, 3, 1, 2).to(torch.float64)
        resized = resize_uint8_like_pil(pixels, self.size).float()
        # data.to_tensor's arithmetic, in its order, in float32
        normalised = (resized / 255.0 - self.mean) / self.std
        maps = self.model(self.features(normalised), normalised.shape[-2:])["anomaly_map"]
        maps = maps.float()
        if self.pool == 1:
            scores = maps.flatten(1).amax(dim=1)
        else:
            scores = F.avg_pool2d(maps[:, None], kernel_size=self.pool, stride=1)
            scores = scores.flatten(1).amax(dim=1)
        out = {"score": scores, "anomaly_map": resize_float_like_pil(maps, height, width)}
        if self.decides:
            out["ng"] = scores >= self.image_threshold
        return out


class ReferenceRRS(nn.Module):
    """RRS in plain PyTorch (ops.rrs_select_reference), eval mode, with the trained
    module's running statistics: what the reference variant's graph holds."""

    def __init__(self, rrs):
        super().__init__()
        self.k_max, self.k_mean = rrs.k_max, rrs.k_mean
        self.momentum, self.eps = rrs.momentum, rrs.eps
        self.register_buffer("running_mean", rrs.running_mean.detach().clone())
        self.register_buffer("running_var", rrs.running_var.detach().clone())

    def forward(self, features, reconstructions, process_group=None):
        return ops.rrs_select_reference(
            features,
            reconstructions,
            self.k_max,
            self.k_mean,
            self.running_mean,
            self.running_var,
            False,
            self.momentum,
            self.eps,
        )


@contextlib.contextmanager
def reference_rrs(model):
    """The model with its RRS swapped for ReferenceRRS, for as long as the block runs."""
    fused = model.rrs
    model.rrs = ReferenceRRS(fused)
    try:
        yield model
    finally:
        model.rrs = fused


def export_program(whole):
    """torch.export of WholeModel, batch, height and width dynamic."""
    size = whole.size
    example = torch.randint(
        0,
        256,
        (2, size + 7, size + 13, 3),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(0),
    )
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    height = torch.export.Dim("height", min=2, max=MAX_SIDE)
    width = torch.export.Dim("width", min=2, max=MAX_SIDE)
    device = next(whole.model.parameters()).device
    with torch.no_grad():
        return torch.export.export(
            whole.eval(), (example.to(device),), dynamic_shapes=({0: batch, 1: height, 2: width},)
        )


def fused_ops_in(program):
    """The realnet operators the program's graph calls, e.g. ['rrs_gather', ...]."""
    return sorted(
        {
            str(node.target).split(".")[1]
            for node in program.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("realnet.")
        }
    )


def save(program, path):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The backbone's weights are channels-last (backbone.py); torch's archive writer
        # warns about any weight that is not a plain contiguous tensor, although it stores
        # and reloads it exactly (export_whole_model checks the reloaded program).
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        torch.export.save(program, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------
# Loading and calling, with one-line errors
# ----------------------------------------------------------------------------------------


def realnet_ops_called(path):
    """The torch.ops.realnet operators a saved program calls, read from its archive's graph
    (without loading it): e.g. ['rrs_gather', 'rrs_rank', 'rrs_stats'], [] for the reference
    variant."""
    try:
        with zipfile.ZipFile(path) as archive:
            graphs = [
                archive.read(n)
                for n in archive.namelist()
                if "/models/" in n and n.endswith(".json")
            ]
    except (OSError, zipfile.BadZipFile):
        return []
    found = set()
    for graph in graphs:
        found |= set(re.findall(rb'"torch\.ops\.realnet\.(\w+)\.', graph))
    return sorted(name.decode() for name in found)


def registered(op):
    try:
        getattr(torch.ops.realnet, op)
        return True
    except (AttributeError, RuntimeError):
        return False


def load(path):
    """An exported program written here. The fused variant needs the realnet operators:
    importing this module registers them when the extension is built; without them the
    error says what to do instead of torch's 40-line deserialisation failure."""
    if not os.path.isfile(path):
        raise UserError(f"{path!r}: no such exported program")
    missing = [op for op in realnet_ops_called(path) if not registered(op)]
    if missing:
        reference = reference_path(path)
        instead = (
            f", or load its reference variant {reference!r} (torch only)"
            if os.path.isfile(reference) and reference != path
            else ""
        )
        raise UserError(
            f"{path!r} calls the fused operators torch.ops.realnet."
            f"{', '.join(missing)}, which are not registered in this process (the "
            "compiled extension realnet/_C*.so is not built or not loaded): "
            "torch.ops.load_library('<repository>/realnet/_C*.so') before "
            f"loading it{instead}"
        )
    try:
        return torch.export.load(path)
    except Exception as e:
        first = f"{type(e).__name__}: {e}".splitlines()[0]
        raise UserError(f"{path!r} is not a readable exported program ({first})")


def check_input(images):
    """One line for an input the program cannot take (else torch's input-spec check of
    the program raises, with a traceback): uint8, (B, H, W, 3), H and W in 2..16384."""
    if not isinstance(images, torch.Tensor):
        raise UserError(f"the program takes a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise UserError(f"the program takes uint8 images (0..255), got {images.dtype}")
    if images.dim() != 4 or images.shape[-1] != 3:
        raise UserError(
            f"the program takes RGB images as (batch, height, width, 3), got shape "
            f"{tuple(images.shape)}"
        )
    sides_fit = all(2 <= side <= MAX_SIDE for side in images.shape[1:3])
    if not (1 <= images.shape[0] <= MAX_BATCH and sides_fit):
        raise UserError(
            f"the program takes 1 to {MAX_BATCH} images of 2 to {MAX_SIDE} pixels a "
            f"side, got shape {tuple(images.shape)}"
        )
    return images


def run(program, images):
    """Call a loaded program on images after check_input."""
    with torch.no_grad():
        return program.module()(check_input(images))


# ----------------------------------------------------------------------------------------
# evaluate.py --export
# ----------------------------------------------------------------------------------------


def reference_path(path):
    return os.path.splitext(path)[0] + ".reference.pt2"


def description_path(path):
    return os.path.splitext(path)[0] + ".export.json"


def check_destination(path):
    """--export PATH before any work: a .pt2 file name in a writable folder."""
    if not path.endswith(".pt2"):
        raise UserError(f"--export {path!r}: expected a file name ending in .pt2")
    if os.path.isdir(path):
        raise UserError(f"--export {path!r} is a folder; expected a file name ending in .pt2")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"--export {path!r}: cannot create its folder ({e.strerror or e})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--export {path!r}: the folder {folder!r} is not writable")
    for other in (reference_path(path), description_path(path)):
        if os.path.isdir(other):
            raise UserError(
                f"--export {path!r}: {other!r} is a folder, and the export writes a file there"
            )


@torch.no_grad()
def predict_pipeline(model, features, path, pool):
    """--predict's numbers for one image file: score (float32) and the map at the image's
    size, PIL-resized as its mask is made."""
    size = model.config["input_size"]
    image = data.to_tensor(data.load_image(path, size))[None].to(next(model.parameters()).device)
    maps = model(features(image), image.shape[-2:])["anomaly_map"].float().cpu().numpy()
    score = metrics.image_scores(maps, pool="max" if pool == 1 else pool)[0]
    width, height = data.image_size_of(path)
    from PIL import Image

    full = Image.fromarray(maps[0], mode="F")
    if full.size != (width, height):
        full = full.resize((width, height), Image.BILINEAR)
    return np.float32(score), np.asarray(full, dtype=np.float32)


@torch.no_grad()
def compare_with_predict(program, model, features, paths, pool, image_threshold):
    """The program on each image alone (its own size, batch of one) and on the first one
    twice (a batch of two) against predict_pipeline."""
    module = program.module()
    device = next(model.parameters()).device
    worst = {"score_relative": 0.0, "map_at_image_size_abs": 0.0}
    verdicts_equal = True
    for path in paths:
        score, full = predict_pipeline(model, features, path, pool)
        pixels = torch.from_numpy(data.load_image(path))[None].to(device)
        out = module(pixels)
        got = float(out["score"][0])
        worst["score_relative"] = max(
            worst["score_relative"], abs(got - float(score)) / max(abs(float(score)), 1e-12)
        )
        worst["map_at_image_size_abs"] = max(
            worst["map_at_image_size_abs"],
            float(np.abs(out["anomaly_map"][0].cpu().numpy() - full).max()),
        )
        if image_threshold is not None:
            verdicts_equal &= bool(out["ng"][0]) == bool(score >= np.float32(image_threshold))
    twice = torch.from_numpy(data.load_image(paths[0]))[None].repeat(2, 1, 1, 1).to(device)
    pair = module(twice)["score"]
    worst["batch_of_two_vs_one_abs"] = float((pair - module(twice[:1])["score"][0]).abs().max())
    return {
        "images": len(paths),
        "max_difference": worst,
        "verdicts_equal": verdicts_equal if image_threshold is not None else None,
    }


def resize_difference(paths, size):
    """Largest |uint8 difference| between resize_uint8_like_pil and data.load_image."""
    worst = 0
    for path in paths:
        pixels = torch.from_numpy(data.load_image(path)).permute(2, 0, 1)[None].double()
        ours = resize_uint8_like_pil(pixels, size)[0].permute(1, 2, 0).numpy()
        pil = data.load_image(path, size).astype(np.float64)
        worst = max(worst, int(np.abs(ours - pil).max()))
    return worst


def export_whole_model(
    model,
    features,
    path,
    check_paths,
    pool=16,
    image_threshold=None,
    pixel_threshold=None,
    checkpoint=None,
    log=print,
):
    """Export the fused and the reference variant, save them, load them back, compare
    them with --predict's pipeline on `check_paths`; write the description file. Returns
    the description (what <PATH>.export.json holds)."""
    check_destination(path)
    whole = WholeModel(features, model, pool, image_threshold).eval()
    variants = {}
    if ops.HAS_EXTENSION:
        variants["fused"] = path
    else:
        log(
            "note: the compiled extension realnet._C is not built: only the reference "
            "variant is exported"
        )
    variants["reference"] = reference_path(path)
    report = {"kind": "realnet_export", "version": 1, "programs": {}}
    for variant, target in variants.items():
        started = time.perf_counter()
        if variant == "reference":
            with reference_rrs(model):
                program = export_program(whole)
        else:
            program = export_program(whole)
        seconds = time.perf_counter() - started
        found = fused_ops_in(program)
        if variant == "fused" and "rrs_gather" not in found:
            raise RuntimeError(f"the exported graph lacks the fused RRS operators ({found})")
        if variant == "reference" and found:
            raise RuntimeError(f"the reference variant calls realnet operators ({found})")
        save(program, target)
        reloaded = load(target)
        report["programs"][variant] = {
            "file": os.path.basename(target),
            "realnet_ops_in_graph": found,
            "needs": (
                "torch and the compiled realnet operators: torch.ops.load_library("
                "'<repository>/realnet/_C*.so') before torch.export.load"
                if found
                else "torch only (plain torch.export.load)"
            ),
            "export_seconds": round(seconds, 2),
            "vs_predict": compare_with_predict(
                reloaded, model, features, check_paths, pool, image_threshold
            ),
        }
    report.update(
        {
            "input": "uint8 RGB images, channels last (batch, height, width, 3); batch 1 to "
            f"{MAX_BATCH}, height and width 2 to {MAX_SIDE}; decode (EXIF orientation, "
            "gray or 16-bit to RGB) as realnet/data.py does before calling",
            "outputs": {
                "score": "(batch,) float32, the image score",
                "anomaly_map": "(batch, height, width) float32, the map at the input's "
                "own size (PIL bilinear from the model's size)",
                **(
                    {"ng": "(batch,) bool, score >= image_threshold (True: NG)"}
                    if image_threshold is not None
                    else {}
                ),
            },
            "preprocessing": f"PIL-exact bilinear resize to {model.config['input_size']} x "
            f"{model.config['input_size']} (uint8, antialiased when shrinking, "
            f"the pass order of Pillow {PIL.__version__}), ImageNet mean/std "
            "normalisation",
            "pillow": PIL.__version__,
            "resize_max_abs_difference_vs_pil": resize_difference(
                check_paths, model.config["input_size"]
            ),
            "image_score": (
                "max of the map"
                if pool == 1
                else f"max of the {pool}x{pool} average-pooled map (stride 1), at the "
                "model's input size"
            ),
            "image_threshold": image_threshold,
            "pixel_threshold": pixel_threshold,
            "pixel_threshold_use": "a defect mask is anomaly_map >= pixel_threshold (not applied "
            "inside the program)",
            "anomaly_map": model.config.get("anomaly_map", "discriminator"),
            "input_size": model.config["input_size"],
            "torch": torch.__version__,
            "checkpoint": (
                {"path": os.path.abspath(checkpoint), "digest": file_digest(checkpoint)}
                if checkpoint
                else None
            ),
            "load": [
                "import torch; torch.ops.load_library('<repository>/realnet/_C*.so')  "
                "# fused variant only",
                f"out = torch.export.load('{os.path.basename(path)}').module()(images)  "
                "# images: uint8 (B, H, W, 3)",
            ],
        }
    )
    report["description"] = description_path(path)
    atomic_write_text(description_path(path), json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def describe(report):
    parts = []
    for variant, program in report["programs"].items():
        check = program["vs_predict"]
        verdicts = (
            ""
            if check["verdicts_equal"] is None
            else f", verdicts {'equal' if check['verdicts_equal'] else 'DIFFERENT'}"
        )
        parts.append(
            f"{variant} {program['file']} (vs --predict on {check['images']} images: "
            f"score rel. diff {check['max_difference']['score_relative']:.2g}{verdicts})"
        )
    return f"exported {'; '.join(parts)}; described in {report['description']}"


def check_images(args, ckpt):
    """The images the exported programs are checked on: the first --batch-size images of
    --predict DIR (no labelled data set needed), else of the first category's test set."""
    if args.predict:
        return list_lot(args.predict)[: args.batch_size]
    dataset = data.open_recorded_dataset(
        args.data, args.format, ckpt.get("dataset"), f"--checkpoint {args.checkpoint!r}"
    )
    categories = parse_list(args.categories) if args.categories else ckpt["categories"]
    return [s.image for s in dataset.test(categories[0])[: args.batch_size]]


def export_model(args, model, features, ckpt, calibrated):
    """evaluate.py --export PATH: the whole model as torch.export programs, checked against
    --predict. The calibration (checked against --image-score and --pool) is inside."""
    pool = args.pool if args.image_score == "avgpool" else 1  # 1: the map's plain maximum
    calibrated = calibrated or {}
    report = export_whole_model(
        model,
        features,
        args.export,
        check_images(args, ckpt),
        pool=pool,
        image_threshold=calibrated.get("image"),
        pixel_threshold=calibrated.get("pixel"),
        checkpoint=args.checkpoint,
    )
    print(describe(report))
