"""Inference speed of the whole model, by a protocol peers can be compared with.

    python3 benchmarks/bench_inference.py --quick     # CPU: demo scale, a few minutes
    python3 benchmarks/bench_inference.py             # GPU when there is one: paper scale
    python3 benchmarks/bench_inference.py --scale paper --device cpu --out results/NAME

What is timed: images (B, 3, S, S), ImageNet-normalised -> anomaly maps (B, S, S): the
frozen backbone, AFS, the reconstruction UNets, RRS and the discriminator (evaluate.py's
forward; no data loading, no image decoding), in eval mode under torch.no_grad, with
random weights (the time does not depend on their values).

  latency     batch 1: median milliseconds of --repeats runs after warm-up
  throughput  batch 16: images per second of the median batch time (SuperSimpleNet's and
              anomalib's protocol: latency at batch 1, throughput at a large batch)
  precision   fp32 | bf16 (torch.autocast; the CPU's RRS kernels take float32, so RRS runs
              in float32 there, as realnet/ops.py does under --precision bf16)
  variant     fused      the compiled RRS operators (realnet/ops.py, csrc/)
              reference  RRS in plain PyTorch (ops.rrs_select_reference)
              compiled   torch.compile of the fused model (the fused ops stay opaque calls,
                         their fake kernels give the shapes); compile time reported apart
  copies      device only: input already on the device, the map left there;
              with copies: a host tensor (pinned) copied to the device and the map copied
              back, inside the timed region. On the CPU there is nothing to copy: measured
              once, both columns are that number.
  parts       backbone (+ AFS), reconstruction (the UNets), RRS, discriminator (+ softmax),
              each timed alone (fp32, fused; RRS also as the reference, in its place), with
              the FLOPs torch.profiler counts
              (with_flops: convolutions and matrix products; the fused RRS, attention's
              softmax and element-wise work are not counted)
  CPU time    on the CPU each time also as process CPU time (time.process_time): on a
              shared machine wall time grows with the load, CPU time much less

Every variant runs in its own process, so that one's compiled code, allocator caches and
memory do not affect the next. Results: a table on stdout; with --out PREFIX also
PREFIX.json and PREFIX.txt (machine, date, torch version, command, load average).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.isolated import in_fresh_process  # noqa: E402

# (layers, AFS dims per layer, input side, UNet width ratio, k_max = k_mean)
SCALES = {
    "paper": {
        "layers": (1, 2, 3, 4),
        "dims": (256, 512, 512, 256),
        "size": 256,
        "width": 0.5,
        "k": 256,
        "what": "the paper's: WideResNet50 layers 1-4, M = 1536, 256 px",
    },
    "demo": {
        "layers": (1, 2),
        "dims": (32, 64),
        "size": 128,
        "width": 0.25,
        "k": 16,
        "what": "demo.sh's: WideResNet50 layers 1-2, M = 96, 128 px",
    },
}
PARTS = ("backbone", "reconstruction", "rrs", "discriminator")


def build(scale, device):
    """Backbone (random weights) and a RealNet of the given scale, in eval mode."""
    import torch
    from realnet.backbone import Backbone
    from realnet.features import FeatureExtractor
    from realnet.model import RealNet, build_config
    import torchvision

    s = SCALES[scale]
    backbone = Backbone(torchvision.models.wide_resnet50_2(), s["layers"])
    channels = [Backbone.channels[layer - 1] for layer in s["layers"]]
    afs = {
        "layers": list(s["layers"]),
        "dims": list(s["dims"]),
        "input_size": s["size"],
        "indices": [list(range(0, c, c // d))[:d] for c, d in zip(channels, s["dims"])],
        "scores": [torch.zeros(c) for c in channels],
        "backbone": backbone.identity,
    }
    config = build_config(
        afs, width_ratio=s["width"], k_max=s["k"], k_mean=s["k"], strides=Backbone.strides
    )
    model = RealNet(config).to(device).eval()
    return FeatureExtractor(backbone.to(device), model), model


def rrs_variant(model, impl, precision, device):
    """Point the model's RRS at the reference, or at float32 inputs (bf16 on the CPU)."""
    from realnet import ops

    rrs = model.rrs
    select = ops.rrs_select_reference if impl == "reference" else ops.rrs_select
    cast = precision != "fp32" and device == "cpu"

    def forward(features, reconstructions, process_group=None):
        if cast:
            features = [f.float() for f in features]
            reconstructions = [r.float() for r in reconstructions]
        return select(
            features,
            reconstructions,
            rrs.k_max,
            rrs.k_mean,
            rrs.running_mean,
            rrs.running_var,
            False,
            rrs.momentum,
            rrs.eps,
        )

    rrs.forward = forward


def timed(run, repeats, sync):
    """Median wall and CPU seconds of `repeats` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        sync()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def autocast(precision, device):
    import contextlib
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def measure_variant(spec):
    """One (precision, variant, batch) in this process: latency/throughput numbers."""
    import torch
    from realnet.export import InferenceModel

    scale, device, precision, impl, batch, repeats = (
        spec[k] for k in ("scale", "device", "precision", "impl", "batch", "repeats")
    )
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    features, model = build(scale, device)
    rrs_variant(model, impl, precision, device)
    net = InferenceModel(features, model).eval()
    if impl == "compiled":
        net = torch.compile(net)
    size = SCALES[scale]["size"]
    host = torch.randn(batch, 3, size, size)
    if device == "cuda":
        host = host.pin_memory()
    on_device = host.to(device)

    def forward(images):
        with torch.no_grad(), autocast(precision, device):
            return net(images)

    started = time.perf_counter()
    forward(on_device)  # the first call compiles (torch.compile) or selects kernels
    sync()
    first_s = time.perf_counter() - started
    forward(on_device)  # a second warm-up run
    result = {**spec, "first_call_s": round(first_s, 3)}
    result["device_only_s"], result["device_only_cpu_s"] = timed(
        lambda: forward(on_device), repeats, sync
    )
    if device == "cuda":
        result["with_copies_s"], _ = timed(
            lambda: forward(host.to(device, non_blocking=True)).to("cpu"), repeats, sync
        )
    return result


def measure_parts(spec):
    """Each part timed alone on its own inputs (fp32, fused), with profiler FLOPs."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from realnet import ops

    scale, device, batch, repeats = (spec[k] for k in ("scale", "device", "batch", "repeats"))
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    features, model = build(scale, device)
    size = SCALES[scale]["size"]
    images = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        feats = features(images)
        recons = [g(f) for g, f in zip(model.reconstruction, feats)]
        selected, _ = model.rrs(feats, recons)
        runs = {
            "backbone": lambda: features(images),
            "reconstruction": lambda: [g(f) for g, f in zip(model.reconstruction, feats)],
            "rrs": lambda: model.rrs(feats, recons),
            "rrs_reference": lambda: ops.rrs_select_reference(
                feats,
                recons,
                model.rrs.k_max,
                model.rrs.k_mean,
                model.rrs.running_mean,
                model.rrs.running_var,
                False,
            ),
            "discriminator": lambda: torch.softmax(
                model.discriminator(selected, (size, size)).float(), dim=1
            ),
        }
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        result = {**spec, "parts": {}}
        for name, run in runs.items():
            run()
            seconds, cpu_seconds = timed(run, repeats, sync)
            with profile(activities=activities, with_flops=True) as prof:
                run()
                sync()
            flops = sum(e.flops or 0 for e in prof.key_averages())
            result["parts"][name] = {"s": seconds, "cpu_s": cpu_seconds, "flops": flops}
    return result


def worker(spec, queue):
    try:
        queue.put(measure_parts(spec) if spec["kind"] == "parts" else measure_variant(spec))
    except Exception as e:  # e.g. torch.compile without a compiler: report, do not hide
        queue.put({**spec, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})


def measure(spec):
    return in_fresh_process(worker, spec)


# ----------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------


def machine(device):
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads"


def variant_rows(results, device):
    lines = [
        f"{'precision':<9} {'variant':<10} {'batch-1 latency ms':>19} {'batch-16 img/s':>15}"
        f"{'  (CPU time: ms, img/s)' if device == 'cpu' else '  (with copies: ms, img/s)'}"
        f"  first call s (b1/b16)"
    ]
    keyed = {(r["precision"], r["impl"], r["batch"]): r for r in results}
    for precision, impl in sorted(
        {(r["precision"], r["impl"]) for r in results},
        key=lambda k: (k[0] != "fp32", ["fused", "reference", "compiled"].index(k[1])),
    ):
        one, many = keyed.get((precision, impl, 1)), keyed.get((precision, impl, 16))
        failed = [r for r in (one, many) if r and "error" in r]
        if failed:
            lines.append(f"{precision:<9} {impl:<10} failed: {failed[0]['error']}")
            continue
        side = "device_only_cpu_s" if device == "cpu" else "with_copies_s"
        ms = lambda r, key: f"{1e3 * r[key]:.1f}" if r else "-"
        per_s = lambda r, key: f"{16 / r[key]:.1f}" if r else "-"
        first = lambda r: f"{r['first_call_s']:.1f}" if r else "-"
        lines.append(
            f"{precision:<9} {impl:<10} {ms(one, 'device_only_s'):>19} "
            f"{per_s(many, 'device_only_s'):>15}  ({ms(one, side):>8}, "
            f"{per_s(many, side):>6})          {first(one)} / {first(many)}"
        )
    return lines


def part_rows(parts, device):
    cpu = device == "cpu"
    lines = [
        f"{'part':<15} {'batch':>5} {'ms':>9} {'share':>6} {'GFLOP/img':>10} {'GFLOP/s':>8}"
        + (f" {'CPU ms':>8}" if cpu else "")
    ]
    for r in parts:
        if "error" in r:
            lines.append(f"parts at batch {r['batch']} failed: {r['error']}")
            continue
        total = sum(r["parts"][name]["s"] for name in PARTS)
        for name in PARTS:
            p = r["parts"][name]
            gflop = p["flops"] / 1e9
            lines.append(
                f"{name:<15} {r['batch']:5d} {1e3 * p['s']:9.1f} "
                f"{100 * p['s'] / total:5.1f}% {gflop / r['batch']:10.2f} "
                f"{gflop / p['s'] if p['flops'] else 0:8.1f}"
                + (f" {1e3 * p['cpu_s']:8.1f}" if cpu else "")
            )
        cpu_total = sum(r["parts"][name]["cpu_s"] for name in PARTS)
        lines.append(
            f"{'sum':<15} {r['batch']:5d} {1e3 * total:9.1f}"
            + (f" {'':6} {'':10} {'':8} {1e3 * cpu_total:8.1f}" if cpu else "")
        )
        reference = r["parts"]["rrs_reference"]
        lines.append(
            f"{'(rrs reference':<15} {r['batch']:5d} {1e3 * reference['s']:9.1f}  "
            f"instead of the fused {1e3 * r['parts']['rrs']['s']:.1f}: "
            f"{reference['s'] / r['parts']['rrs']['s']:.1f}x)"
        )
    return lines


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: CUDA when available",
    )
    parser.add_argument(
        "--scale",
        default=None,
        choices=sorted(SCALES),
        help="model size; default paper on CUDA, demo on the CPU",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CPU-sized: demo scale, 3 repeats, no torch.compile (compiling "
        "took 270 s per batch size on 2 loaded cores; --variants adds it)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per number (default 10, 3 with --quick)",
    )
    parser.add_argument(
        "--precisions",
        default="fp32,bf16",
        help="comma-separated: fp32,bf16,fp16 (fp16: CUDA only)",
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated: fused,reference,compiled (default all three; "
        "fused,reference with --quick)",
    )
    parser.add_argument(
        "--batches",
        default="1,16",
        help="comma-separated: 1 (latency) and/or 16 (throughput); the paper "
        "scale on a small CPU: 1",
    )
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.txt")
    args = parser.parse_args()

    import torch
    from realnet import ops

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: CUDA is not available on this machine")
    scale = args.scale or ("demo" if args.quick or device == "cpu" else "paper")
    repeats = args.repeats or (3 if args.quick else 10)
    precisions = [p for p in args.precisions.split(",") if p]
    if "fp16" in precisions and device == "cpu":
        sys.exit("error: --precisions fp16 needs CUDA (use fp32 or bf16 on the CPU)")
    variants = [
        v
        for v in (
            args.variants or ("fused,reference" if args.quick else "fused,reference,compiled")
        ).split(",")
        if v
    ]
    if not set(variants) <= {"fused", "reference", "compiled"}:
        sys.exit(
            f"error: --variants {args.variants}: expected a comma-separated choice of "
            "fused, reference, compiled"
        )
    if not set(precisions) <= {"fp32", "bf16", "fp16"}:
        sys.exit(
            f"error: --precisions {args.precisions}: expected a comma-separated choice of "
            "fp32, bf16, fp16"
        )
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        batches = None
    if not batches or not set(batches) <= {1, 16}:
        sys.exit(f"error: --batches {args.batches}: the protocol's batches are 1 and 16")
    threads = os.environ.get("OMP_NUM_THREADS")
    command = " ".join(
        ([f"OMP_NUM_THREADS={threads}"] if threads else []) + ["python3"] + sys.argv
    )
    load_before = os.getloadavg()
    started = time.time()
    header = [
        f"# {datetime.date.today()} | {machine(device)} | torch {torch.__version__} | "
        f"extension: {ops.HAS_EXTENSION}",
        f"# command: {command}",
        f"# scale: {scale} ({SCALES[scale]['what']}); median of {repeats} runs after 2 "
        f"warm-up runs; each number in its own process",
    ]
    print("\n".join(header), flush=True)

    results = []
    for precision in precisions:
        for impl in variants:
            for batch in batches:
                spec = {
                    "kind": "variant",
                    "scale": scale,
                    "device": device,
                    "precision": precision,
                    "impl": impl,
                    "batch": batch,
                    "repeats": repeats,
                }
                results.append(measure(spec))
                r = results[-1]
                print(
                    f"  {precision} {impl} batch {batch}: "
                    + (r["error"] if "error" in r else f"{1e3 * r['device_only_s']:.1f} ms"),
                    flush=True,
                )
    parts = [
        measure(
            {"kind": "parts", "scale": scale, "device": device, "batch": batch, "repeats": repeats}
        )
        for batch in batches
    ]
    load_after = os.getloadavg()
    cpu_note = (
        "CPU time per run is process time (all threads); wall time above it means "
        "the process waited for a core"
        if device == "cpu"
        else "with copies: pinned host input -> device, map -> host, timed"
    )
    text = header + [
        f"# load average (1, 5, 15 min) before {load_before}, after {load_after} on "
        f"{os.cpu_count()} cores; {round(time.time() - started)} s in all",
        "",
        "whole model: images -> anomaly maps",
        *variant_rows(results, device),
        f"  ({cpu_note})",
        "",
        "parts (fp32, fused; FLOPs: torch.profiler with_flops, convolutions and matrix products)",
        *part_rows(parts, device),
    ]
    print("\n".join(text[len(header) :]))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".txt", "w") as f:
            f.write("\n".join(text) + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump(
                {
                    "date": str(datetime.date.today()),
                    "machine": machine(device),
                    "torch": torch.__version__,
                    "command": command,
                    "scale": scale,
                    "scale_description": SCALES[scale]["what"],
                    "repeats": repeats,
                    "load_average_before": load_before,
                    "load_average_after": load_after,
                    "variants": results,
                    "parts": parts,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
