"""Fused RRS/AFS operators vs the plain-PyTorch reference (and torch.compile of it).

    python3 benchmarks/bench_ops.py                  # CPU: batch 4; GPU (if any): batch 16
    python3 benchmarks/bench_ops.py --device cpu --batch-size 16
    python3 benchmarks/bench_ops.py --device cuda --dtypes float32,bfloat16,float16 \\
        --kernels 1,2 --json out.json

Shapes are the paper's (docs/method.md, section 6): residual levels 256@64², 512@32², 512@16²,
256@8², k_max = k_mean = 256; AFS on WideResNet50 layer3, 1024@16², mask 256², batch 16.
On CUDA every version of the CUDA kernels (csrc/cuda/v1.cu, v2.cu, ...; --kernels) is timed
as its own row, "fused v1", "fused v2".
  time      CPU: median of --repeats runs after warm-up, wall clock.
            CUDA: median of --repeats samples; a sample is a CUDA-event interval around
            back-to-back calls (as many as fill ~2 ms, so launch gaps and Python overhead
            count as a training loop sees them), divided by the calls. Inputs rotate among
            copies that together exceed the L2 cache, so no call finds its inputs there.
  latency   CUDA, batch 1 forward: each call alone, synchronised (what one image waits).
  memory    peak above what the inputs already hold: CUDA max_memory_allocated, or on
            the CPU the peak resident set (VmHWM, reset after warm-up) minus the resident
            set before the measured runs (with glibc's mmap threshold fixed, so that freed
            tensors leave the resident set at once)
  GB/s      bytes that must move (each input read once, each output written once; for
            forward+backward also the upstream gradient read once and grad_recons written
            once) divided by the time; "% peak" against the card's peak bandwidth
            (--peak-bandwidth, or the datasheet figure for a card this file knows)
Every (op, pass, dtype) runs in its own process (torch.compile of the reference in yet
another), so that one's memory cannot inflate another's.
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
PEAK_BANDWIDTH = {
    "H100 80GB HBM3": 3.35e12,
    "H100 PCIe": 2.0e12,
    "H200": 4.8e12,
}  # datasheets, bytes/s
L2_BYTES = 60e6  # rotate inputs over more than this (an H100's L2 is 50 MB, an H200's 60 MB)
SAMPLE_SECONDS = 2e-3


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


def make_rrs_inputs(batch, device, dtype, seed=0):
    import torch

    g = torch.Generator(device).manual_seed(seed)  # drawn where they are used: fast on a GPU

    def draw(fn, *shape):
        return fn(*shape, generator=g, device=device).to(dtype)

    feats = [draw(torch.rand, batch, c, s, s) for c, s in LEVELS]
    recons = [(f + 0.1 * draw(torch.randn, *f.shape)).requires_grad_() for f in feats]
    M = sum(c for c, _ in LEVELS)
    upstream = draw(torch.randn, batch, K_MAX + K_MEAN, LEVELS[0][1], LEVELS[0][1])
    return feats, recons, torch.zeros(M, device=device), torch.ones(M, device=device), upstream


def make_afs_inputs(batch, device, dtype, seed=0):
    import torch

    channels, side, mask_side = AFS_SHAPE
    g = torch.Generator(device).manual_seed(seed)
    normal = torch.rand(batch, channels, side, side, generator=g, device=device).to(dtype)
    anomalous = normal + 0.3 * torch.randn(normal.shape, generator=g, device=device).to(dtype)
    mask = (torch.rand(batch, 1, mask_side, mask_side, generator=g, device=device) > 0.9).float()
    return anomalous, normal, mask


def rrs_bytes(batch, dtype_size, backward):
    inputs = sum(2 * batch * c * s * s for c, s in LEVELS) * dtype_size
    output = batch * (K_MAX + K_MEAN) * LEVELS[0][1] ** 2 * dtype_size
    if not backward:
        return inputs + output
    grad_recons = inputs // 2
    return inputs + output + output + grad_recons  # + upstream gradient read, grad written


def afs_bytes(batch, dtype_size):
    channels, side, mask_side = AFS_SHAPE
    return (
        2 * batch * channels * side * side * dtype_size + batch * mask_side**2 * 4 + channels * 4
    )


def time_cuda(calls, repeats):
    """Median seconds per call: CUDA events around back-to-back calls (see the docstring)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for call in calls:
        call()
    end.record()
    torch.cuda.synchronize()
    per_call = start.elapsed_time(end) / 1e3 / len(calls)
    inner = max(1, min(200, round(SAMPLE_SECONDS / per_call)))
    samples = []
    for _ in range(repeats):
        start.record()
        for i in range(inner):
            calls[i % len(calls)]()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(samples)


def time_latency(call, repeats):
    """Median seconds of one call alone, synchronised before and after."""
    import torch

    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(spec, queue):
    """Measure the implementations `impls` of one (op, pass, device, batch, dtype) in this
    process and put one result per implementation on the queue (as a list)."""
    import torch
    from realnet import ops

    op, impls, which, device, batch, dtype_name, repeats = spec
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    cuda = device == "cuda"
    element = torch.empty((), dtype=dtype).element_size()
    moved = (
        afs_bytes(batch, element)
        if op == "afs_channel_loss"
        else rrs_bytes(batch, element, which == "forward+backward")
    )
    copies = max(1, int(-(-L2_BYTES // moved)) + 1) if cuda and which != "latency" else 1
    inputs = [
        (make_afs_inputs if op == "afs_channel_loss" else make_rrs_inputs)(
            batch, device, dtype, seed
        )
        for seed in range(copies)
    ]
    results = []
    for impl in impls:
        try:
            version = int(impl.split(" v")[1]) if impl.startswith("fused v") else None
            if version is not None:
                ops.cuda_kernels(version)
            if op == "rrs_select":
                fn = {
                    "reference": ops.rrs_select_reference,
                    "compiled reference": torch.compile(ops.rrs_select_reference),
                }.get(impl, ops.rrs_select)

                def make_call(feats, recons, rm, rv, upstream):
                    def call():
                        selected, _ = fn(feats, recons, K_MAX, K_MEAN, rm, rv, True)
                        if which == "forward+backward":
                            torch.autograd.grad(selected, recons, upstream)

                    return call
            else:
                fn = {
                    "reference": ops.afs_channel_loss_reference,
                    "compiled reference": torch.compile(ops.afs_channel_loss_reference),
                }.get(impl, ops.afs_channel_loss)

                def make_call(anomalous, normal, mask):
                    return lambda: fn(anomalous, normal, mask)

            calls = [make_call(*x) for x in inputs]
            with torch.no_grad() if which != "forward+backward" else torch.enable_grad():
                for call in calls + calls[:1]:  # warm-up (and compilation)
                    call()
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    seconds = (
                        time_latency(calls[0], repeats)
                        if which == "latency"
                        else time_cuda(calls, repeats)
                    )
                    peak = torch.cuda.max_memory_allocated() - base
                else:
                    reset_peak_rss()
                    base = rss_bytes("VmRSS")
                    times = []
                    for _ in range(repeats):
                        start = time.perf_counter()
                        calls[0]()
                        times.append(time.perf_counter() - start)
                    seconds = statistics.median(times)
                    peak = rss_bytes("VmHWM") - base
            results.append(
                {
                    "op": op,
                    "impl": impl,
                    "pass": which,
                    "dtype": dtype_name,
                    "batch": batch,
                    "seconds": seconds,
                    "peak_bytes": max(peak, 0),
                    "bytes_moved": moved,
                    "gb_per_s": moved / seconds / 1e9,
                }
            )
        except Exception as e:  # e.g. torch.compile unavailable: report, do not hide
            results.append(
                {
                    "op": op,
                    "impl": impl,
                    "pass": which,
                    "dtype": dtype_name,
                    "batch": batch,
                    "error": f"{type(e).__name__}: {e}".splitlines()[0],
                }
            )
    queue.put(results)


def measure(spec):
    return in_fresh_process(worker, spec)


def print_rows(rows, peak_bandwidth):
    for r in rows:
        label = f"  {r['pass']:<17} {r['dtype']:<9} {r['impl']:<19}"
        if "error" in r:
            print(f"{label} failed: {r['error']}")
            continue
        frac = (
            f" {100 * r['bytes_moved'] / r['seconds'] / peak_bandwidth:7.1f}"
            if peak_bandwidth
            else ""
        )
        print(
            f"{label} {1e3 * r['seconds']:9.3f} {r['peak_bytes'] / 2**20:9.1f} "
            f"{r['gb_per_s']:7.0f}{frac}"
        )


def print_ratios(rows):
    ok = {r["impl"]: r for r in rows if "error" not in r}
    for fused in [i for i in ok if i.startswith("fused")]:
        for other in [i for i in ok if not i.startswith("fused")]:
            print(
                f"  -> {fused} vs {other} ({rows[0]['pass']}, {rows[0]['dtype']}): "
                f"{ok[other]['seconds'] / ok[fused]['seconds']:.2f}x faster"
            )


def goals(results):
    """The goals of the kernels' issue, checked on one run: (statement, measured, met) rows."""
    ok = {(r["op"], r["pass"], r["dtype"], r["impl"]): r for r in results if "error" not in r}

    def t(op, which, dtype, impl):
        r = ok.get((op, which, dtype, impl))
        return r["seconds"] if r else None

    rows = []
    for impl in sorted({r["impl"] for r in results if r["impl"].startswith("fused")}):
        fb = t("rrs_select", "forward+backward", "float32", impl)
        f = t("rrs_select", "forward", "float32", impl)
        r = ok.get(("rrs_select", "forward+backward", "float32", impl))
        if r and r.get("peak_fraction") is not None:
            rows.append(
                (
                    f"{impl}: rrs_select fwd+bwd fp32 >= 60 % of peak bandwidth",
                    f"{100 * r['peak_fraction']:.1f} %",
                    r["peak_fraction"] >= 0.6,
                )
            )
        for other, need in (("reference", 5.0), ("compiled reference", 1.5)):
            o = t("rrs_select", "forward+backward", "float32", other)
            if fb and o:
                rows.append(
                    (
                        f"{impl}: rrs_select fwd+bwd fp32 >= {need}x {other}",
                        f"{o / fb:.2f}x",
                        o / fb >= need,
                    )
                )
        o = t("rrs_select", "forward", "float32", "compiled reference")
        if f and o:
            rows.append(
                (
                    f"{impl}: rrs_select forward fp32 >= 1.5x compiled reference",
                    f"{o / f:.2f}x",
                    o / f >= 1.5,
                )
            )
        for dtype in ("bfloat16", "float16"):
            for which in ("forward", "forward+backward"):
                low, full = (
                    t("rrs_select", which, dtype, impl),
                    t("rrs_select", which, "float32", impl),
                )
                if low and full:
                    rows.append(
                        (
                            f"{impl}: rrs_select {which} {dtype} <= 0.6x its fp32 time",
                            f"{low / full:.2f}x",
                            low / full <= 0.6,
                        )
                    )
        a = t("afs_channel_loss", "forward", "float32", impl)
        for other, need in (("reference", 5.0), ("compiled reference", 1.5)):
            o = t("afs_channel_loss", "forward", "float32", other)
            if a and o:
                rows.append(
                    (
                        f"{impl}: afs_channel_loss fp32 >= {need}x {other}",
                        f"{o / a:.2f}x",
                        o / a >= need,
                    )
                )
    return rows


def markdown(summary):
    """The run as markdown: every row, then the goals."""
    bandwidth = summary["peak_bandwidth"]
    lines = [
        f"Device: {summary['device']}; torch {summary['torch']}; {summary['date']}; "
        f"batch {summary['batch']}; median of {summary['repeats']} samples; "
        f"peak bandwidth {f'{bandwidth / 1e12:.2f} TB/s' if bandwidth else 'not known'}.",
        f"Command: `{summary['command']}`",
        "",
        "| op | pass | dtype | implementation | ms | GB/s | % peak | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["results"]:
        if "error" in r:
            lines.append(
                f"| {r['op']} | {r['pass']} | {r['dtype']} | {r['impl']} "
                f"| failed: {r['error']} | | | |"
            )
            continue
        frac = f"{100 * r['peak_fraction']:.1f}" if r.get("peak_fraction") is not None else ""
        lines.append(
            f"| {r['op']} | {r['pass']} (batch {r['batch']}) | {r['dtype']} | {r['impl']} | "
            f"{1e3 * r['seconds']:.3f} | {r['gb_per_s']:.0f} | {frac} "
            f"| {r['peak_bytes'] / 2**20:.0f} |"
        )
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    lines += [
        f"| {goal} | {value} | {'yes' if met else '**no**'} |"
        for goal, value, met in goals(summary["results"])
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="default: 16 on CUDA (the paper's), 4 on the CPU",
    )
    parser.add_argument(
        "--dtypes",
        default="float32",
        help="comma-separated: float32, float16, bfloat16 (the last two CUDA only)",
    )
    parser.add_argument(
        "--kernels",
        default=None,
        help="CUDA kernel versions to time, comma-separated (default: all); CPU: ignored",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="samples per row (default: 30 CUDA, 5 CPU)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument(
        "--compile-dtypes",
        default="float32",
        help="dtypes that also time torch.compile(reference) (each compile takes a while)",
    )
    parser.add_argument(
        "--peak-bandwidth",
        type=float,
        default=None,
        help="bytes/s; default: the datasheet figure of a known card (H100, H200)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--markdown", default=None, help="also write the rows and the goals' check here"
    )
    args = parser.parse_args()

    # glibc would keep freed tensors in its heap after warm-up and hide later peaks from
    # the resident-set count; a fixed mmap threshold returns every large block at free.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    import torch
    from realnet import ops

    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    cuda = device == "cuda"
    batch = args.batch_size or (16 if cuda else 4)
    repeats = args.repeats or (30 if cuda else 5)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    peak = args.peak_bandwidth or next(
        (bw for card, bw in PEAK_BANDWIDTH.items() if cuda and card in name), None
    )
    versions = (
        (
            [int(v) for v in args.kernels.split(",")]
            if args.kernels
            else list(ops.CUDA_KERNEL_VERSIONS)
        )
        if cuda and ops.HAS_EXTENSION
        else [None]
    )
    fused = [f"fused v{v}" if v else "fused" for v in versions]
    dtypes = args.dtypes.split(",")
    print(
        f"device: {name} | torch {torch.__version__} | extension: {ops.HAS_EXTENSION} "
        f"| batch {batch} | "
        f"{'CUDA events, back-to-back calls' if cuda else 'wall clock'}, median of {repeats}"
        + (f" | peak bandwidth {peak / 1e12:.2f} TB/s" if peak else "")
    )
    results = []
    for op, passes, shape in [
        (
            "rrs_select",
            ["forward", "forward+backward"],
            " + ".join(f"{c}@{s}²" for c, s in LEVELS) + f", k_max = k_mean = {K_MAX}",
        ),
        ("afs_channel_loss", ["forward"], f"{AFS_SHAPE[0]}@{AFS_SHAPE[1]}², mask {AFS_SHAPE[2]}²"),
    ]:
        print(f"\n{op} ({shape}, batch {batch})")
        print(
            f"  {'pass':<17} {'dtype':<9} {'implementation':<19} {'time ms':>9} "
            f"{'peak MB':>9} {'GB/s':>7}"
            f"{' % peak' if peak else ''}"
        )
        for dtype in dtypes:
            for which in passes:
                rows = measure((op, fused + ["reference"], which, device, batch, dtype, repeats))
                if not args.no_compile and dtype in args.compile_dtypes.split(","):
                    rows += measure(
                        (op, ["compiled reference"], which, device, batch, dtype, repeats)
                    )
                print_rows(rows, peak)
                print_ratios(rows)
                results += rows
        if cuda and op == "rrs_select":  # one image: what a production line waits
            rows = measure((op, fused + ["reference"], "latency", device, 1, "float32", repeats))
            print_rows(rows, None)
            results += rows
    for r in results:
        if "error" not in r and peak and r["pass"] != "latency":
            r["peak_fraction"] = r["bytes_moved"] / r["seconds"] / peak
    summary = {
        "device": name,
        "torch": torch.__version__,
        "batch": batch,
        "repeats": repeats,
        "peak_bandwidth": peak,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python3 " + " ".join(sys.argv),
        "results": results,
    }
    checked = goals(results)
    if checked:
        print("\ngoals")
        for goal, value, met in checked:
            print(f"  {'met    ' if met else 'NOT MET'} {goal}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(summary))


if __name__ == "__main__":
    main()
