"""Fused RRS/AFS operators vs the plain-PyTorch reference (and torch.compile of it).

    python3 benchmarks/bench_ops.py                  # CPU: batch 4; GPU (if any): batch 16
    python3 benchmarks/bench_ops.py --device cpu --batch-size 16
    python3 benchmarks/bench_ops.py --device cuda --peak-bandwidth 4.8e12 --json out.json

Shapes are the paper's (docs/method.md, section 6): residual levels 256@64², 512@32², 512@16², 256@8²,
k_max = k_mean = 256; AFS on WideResNet50 layer3, 1024@16², mask 256², batch 16.
Each variant runs in its own process, so one's memory cannot inflate another's:
  time      median of --repeats runs after warm-up (CUDA synchronised)
  memory    peak above what the inputs already hold: CUDA max_memory_allocated, or on
            the CPU the peak resident set (VmHWM, reset after warm-up) minus the resident
            set before the measured runs (with glibc's mmap threshold fixed, so that freed
            tensors leave the resident set at once)
  GB/s      bytes that must move (each input read once, each output written once)
            divided by the time; with --peak-bandwidth also as a fraction of the peak
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.isolated import in_fresh_process  # noqa: E402

LEVELS = [(256, 64), (512, 32), (512, 16), (256, 8)]  # (channels, side) per residual level
K_MAX = K_MEAN = 256
AFS_SHAPE = (1024, 16, 256)  # layer3 channels, feature side, mask side


def rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_rrs_inputs(batch, device, dtype):
    import torch
    g = torch.Generator().manual_seed(0)
    feats = [torch.rand(batch, c, s, s, generator=g).to(device, dtype) for c, s in LEVELS]
    recons = [(f + 0.1 * torch.randn(f.shape, generator=g).to(device, dtype)).requires_grad_() for f in feats]
    M = sum(c for c, _ in LEVELS)
    upstream = torch.randn(batch, K_MAX + K_MEAN, LEVELS[0][1], LEVELS[0][1], generator=g).to(device, dtype)
    return feats, recons, torch.zeros(M, device=device), torch.ones(M, device=device), upstream


def rrs_bytes(batch, dtype_size, backward):
    inputs = sum(2 * batch * c * s * s for c, s in LEVELS) * dtype_size
    output = batch * (K_MAX + K_MEAN) * LEVELS[0][1] ** 2 * dtype_size
    if not backward:
        return inputs + output
    grad_recons = inputs // 2
    return inputs + output + output + grad_recons  # + upstream gradient read, grad written


def worker(spec, queue):
    """Measure one variant: spec = (op, impl, pass, device, batch, dtype, repeats)."""
    import torch
    from realnet import ops
    op, impl, which, device, batch, dtype_name, repeats = spec
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        if op == "rrs_select":
            feats, recons, rm, rv, upstream = make_rrs_inputs(batch, device, dtype)
            fn = {"fused": ops.rrs_select, "reference": ops.rrs_select_reference,
                  "compiled reference": torch.compile(ops.rrs_select_reference)}[impl]

            def run():
                selected, _ = fn(feats, recons, K_MAX, K_MEAN, rm, rv, True)
                if which == "forward+backward":
                    torch.autograd.grad(selected, recons, upstream)
            moved = rrs_bytes(batch, feats[0].element_size(), which == "forward+backward")
        else:
            channels, side, mask_side = AFS_SHAPE
            g = torch.Generator().manual_seed(0)
            normal = torch.rand(batch, channels, side, side, generator=g).to(device, dtype)
            anomalous = normal + 0.3 * torch.randn(normal.shape, generator=g).to(device, dtype)
            mask = (torch.rand(batch, 1, mask_side, mask_side, generator=g) > 0.9).float().to(device)
            fn = {"fused": ops.afs_channel_loss, "reference": ops.afs_channel_loss_reference,
                  "compiled reference": torch.compile(ops.afs_channel_loss_reference)}[impl]

            def run():
                fn(anomalous, normal, mask)
            moved = 2 * normal.numel() * normal.element_size() + mask.numel() * 4 + channels * 4

        with torch.no_grad() if which == "forward" else torch.enable_grad():
            for _ in range(2):  # warm-up (and compilation)
                run()
            sync()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                reset_peak_rss()
                base = rss_bytes("VmRSS")
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                sync()
                times.append(time.perf_counter() - start)
            peak = (torch.cuda.max_memory_allocated() if device == "cuda" else rss_bytes("VmHWM")) - base
        seconds = statistics.median(times)
        queue.put({"op": op, "impl": impl, "pass": which, "seconds": seconds, "peak_bytes": max(peak, 0),
                   "bytes_moved": moved, "gb_per_s": moved / seconds / 1e9})
    except Exception as e:  # e.g. torch.compile unavailable: report, do not hide
        queue.put({"op": op, "impl": impl, "pass": which, "error": f"{type(e).__name__}: {e}".splitlines()[0]})


def measure(spec):
    return in_fresh_process(worker, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 on CUDA (the paper's), 4 on the CPU")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--peak-bandwidth", type=float, default=None, help="bytes/s, e.g. 4.8e12 for an H200")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    # glibc would keep freed tensors in its heap after warm-up and hide later peaks from
    # the resident-set count; a fixed mmap threshold returns every large block at free.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    import torch
    from realnet import ops
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    batch = args.batch_size or (16 if device == "cuda" else 4)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name} | torch {torch.__version__} | extension: {ops.HAS_EXTENSION} | batch {batch} | "
          f"{args.dtype} | median of {args.repeats}")
    impls = ["fused", "reference"] + ([] if args.no_compile else ["compiled reference"])
    results = []
    for op, passes, shape in [
        ("rrs_select", ["forward", "forward+backward"],
         " + ".join(f"{c}@{s}²" for c, s in LEVELS) + f", k_max = k_mean = {K_MAX}"),
        ("afs_channel_loss", ["forward"], f"{AFS_SHAPE[0]}@{AFS_SHAPE[1]}², mask {AFS_SHAPE[2]}²"),
    ]:
        print(f"\n{op} ({shape}, batch {batch})")
        print(f"  {'pass':<17} {'implementation':<19} {'time ms':>9} {'peak MB':>9} {'GB/s':>7}"
              f"{'  % peak BW' if args.peak_bandwidth else ''}")
        for which in passes:
            rows = {impl: measure((op, impl, which, device, batch, args.dtype, args.repeats)) for impl in impls}
            for impl, r in rows.items():
                results.append(r)
                if "error" in r:
                    print(f"  {which:<17} {impl:<19} failed: {r['error']}")
                    continue
                frac = f"  {100 * r['bytes_moved'] / r['seconds'] / args.peak_bandwidth:9.1f}" if args.peak_bandwidth else ""
                print(f"  {which:<17} {impl:<19} {1e3 * r['seconds']:9.2f} {r['peak_bytes'] / 2**20:9.1f} "
                      f"{r['gb_per_s']:7.1f}{frac}")
            fused = rows["fused"]
            for impl in impls[1:]:
                other = rows[impl]
                if "error" in fused or "error" in other:
                    continue
                mem = (f"{other['peak_bytes'] / fused['peak_bytes']:.2f}x less peak memory"
                       if fused["peak_bytes"] > 0 else "peak memory n/a")
                print(f"  -> fused vs {impl}: {other['seconds'] / fused['seconds']:.2f}x faster, {mem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "batch": batch, "dtype": args.dtype,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
