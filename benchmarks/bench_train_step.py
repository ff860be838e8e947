"""Where a RealNet training step spends its time, per part, in fp32 and bf16 (train_realnet.py
--precision). Measured at the demo's scale by default; give the paper's flags for its.

    python3 benchmarks/bench_train_step.py                       # demo scale, the CPU
    python3 benchmarks/bench_train_step.py --json out.json
    python3 benchmarks/bench_train_step.py --input-size 256 --dims 128 256 --width-ratio 0.5 \\
        --batch-size 16 --device cuda

The parts of one step (batch B, half of it synthetic anomalies):
  backbone   the frozen WideResNet50-2 on the B/2 anomalous images (the clean half and every
             reconstruction target come from train_realnet's feature cache)
  UNets      the reconstruction UNets' forward pass, one per level
  head       RRS, the discriminator and the loss, forward
  backward   the whole backward pass (the segmentation loss reaches the UNets through RRS)
  Adam       the optimiser step
Not in the step: anomaly synthesis, which train_realnet.py's loader workers do beside it.
On the CPU each part is timed in CPU time of the calling thread (`time.thread_time`, with
one intra-op thread), so that other jobs on the machine change the figures little; on
CUDA in synchronised wall time. The median of --repeats steps after --warmup.

The AFS channels are a fixed random choice (the cost does not depend on which channels).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from realnet import precision  # noqa: E402
from realnet.backbone import Backbone, load_backbone  # noqa: E402
from realnet.features import FeatureExtractor  # noqa: E402
from realnet.model import RealNet, build_config, count_parameters  # noqa: E402
from train_realnet import Trainer, train_step  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input-size", type=int, default=128, help="image side (demo: 128)")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="backbone layers (demo)")
    p.add_argument(
        "--dims", type=int, nargs="+", default=[64, 128], help="AFS channels per layer (demo)"
    )
    p.add_argument("--width-ratio", type=float, default=0.25, help="UNet width (demo: 0.25)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step (demo: 8)")
    p.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16"], choices=list(precision.PRECISIONS)
    )
    p.add_argument("--repeats", type=int, default=10, help="measured steps per precision")
    p.add_argument("--warmup", type=int, default=3, help="steps before measuring")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def demo_model(args, device):
    """A RealNet of the requested size on a random backbone, random AFS channels."""
    g = torch.Generator().manual_seed(0)
    channels = [Backbone.channels[layer - 1] for layer in args.layers]
    afs = {
        "layers": args.layers,
        "dims": args.dims,
        "input_size": args.input_size,
        "scores": [[0.0] * c for c in channels],
        "indices": [
            sorted(torch.randperm(c, generator=g)[:d].tolist())
            for c, d in zip(channels, args.dims)
        ],
    }
    config = build_config(afs, width_ratio=args.width_ratio)
    return RealNet(config).to(device).train()


def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.thread_time()


PARTS = {  # part of a step -> what the table calls it
    "backbone_ms": "backbone on the anomalous half",
    "unets_ms": "reconstruction UNets, forward",
    "head_ms": "RRS + discriminator + loss, forward",
    "backward_ms": "backward, all of it",
    "adam_ms": "Adam",
}


def one_step(features, model, optimizer, scaler, batch, cache, amp, device):
    """One training step, train_realnet.train_step itself; returns the seconds of each part
    (PARTS order). The parts' ends are read by train_step's `mark` and, for the end of the
    UNets' forward, by a hook on RRS."""
    trainer = Trainer(model, features, cache, optimizer, scaler, amp, device)
    marks = [clock(device)]
    hook = model.rrs.register_forward_pre_hook(lambda *_: marks.append(clock(device)))
    try:
        train_step(trainer, batch, 1e-4, mark=lambda part: marks.append(clock(device)))
    finally:
        hook.remove()
    # marks: start, backbone, (RRS hook) UNets, head, backward, adam
    return [b - a for a, b in zip(marks, marks[1:])]


def measure(args, name, backbone, device):
    torch.manual_seed(0)
    model = demo_model(args, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = precision.grad_scaler(name, device)
    amp = precision.autocast(name, device)
    half = args.batch_size // 2  # the first half anomalous, as the training stream mixes them
    batch = {
        "image": torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device),
        "mask": (
            torch.rand(args.batch_size, 1, args.input_size, args.input_size, device=device) > 0.9
        ).float(),
        "anomalous": torch.arange(args.batch_size, device=device) < half,
        "index": torch.arange(args.batch_size, device=device),
    }
    features = FeatureExtractor(backbone, model)  # backbone -> AFS, as in training
    with amp:  # the cache is made in the step's precision, as train_realnet.py does
        clean_features = features(batch["image"])

    def cache(index):  # train_realnet's feature cache: the clean images' features by index
        return [f[index] for f in clean_features]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [
        one_step(features, model, optimizer, scaler, batch, cache, amp, device)
        for _ in range(args.warmup + args.repeats)
    ][args.warmup :]
    row = {"precision": name}
    if device.type == "cuda":  # everything the step holds at its peak: weights, Adam, activations
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    for i, part in enumerate(PARTS):
        row[part] = round(1e3 * statistics.median(t[i] for t in times), 1)
    row["model_ms"] = round(1e3 * statistics.median(sum(t[1:]) for t in times), 1)
    row["step_ms"] = round(1e3 * statistics.median(sum(t) for t in times), 1)
    row["images_per_s"] = round(args.batch_size / (row["step_ms"] / 1e3), 1)
    row["trainable_parameters"] = count_parameters(model)
    return row


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # thread CPU time is the whole cost with one thread
    for name in args.precisions:
        precision.check_precision(name, device)
    backbone = load_backbone("random", args.layers).to(device)
    rows = [measure(args, name, backbone, device) for name in args.precisions]
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores"
        if device.type == "cpu"
        else torch.cuda.get_device_name(device)
    )
    print(
        f"{time.strftime('%Y-%m-%d')}, {machine}, torch {torch.__version__}, "
        f"{'1 thread, thread CPU time' if device.type == 'cpu' else 'synchronised wall time'}"
    )
    print(
        f"input {args.input_size} px, layers {args.layers}, AFS dims {args.dims}, width "
        f"{args.width_ratio}, batch {args.batch_size} (half anomalous), median of "
        f"{args.repeats} steps"
    )
    cuda = device.type == "cuda"
    print(
        "| precision | "
        + " | ".join(f"{what}, ms" for what in PARTS.values())
        + " | step, ms | images/s |"
        + (" peak GPU MiB |" if cuda else "")
    )
    print("|---" * (len(PARTS) + 4 + cuda) + "|")
    for r in rows:
        print(
            f"| {r['precision']} | "
            + " | ".join(str(r[part]) for part in PARTS)
            + f" | {r['step_ms']} | {r['images_per_s']} |"
            + (f" {r['peak_gpu_mib']} |" if cuda else "")
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "date": time.strftime("%Y-%m-%d"),
                    "machine": machine,
                    "torch": torch.__version__,
                    "args": vars(args),
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
