"""Where the fused RRS spends its GPU time, kernel by kernel, for each version of the CUDA kernels.

    python3 benchmarks/profile_ops.py                 # paper shapes, batch 16, float32
    python3 benchmarks/profile_ops.py --kernels 2 --dtype bfloat16

One forward+backward of ops.rrs_select (the shapes of benchmarks/bench_ops.py) under
torch.profiler, after warm-up; prints each version's CUDA kernels by total device time.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.bench_ops import K_MAX, K_MEAN, make_rrs_inputs  # noqa: E402
from realnet import ops  # noqa: E402


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--kernels",
        default=",".join(map(str, ops.CUDA_KERNEL_VERSIONS)),
        help="CUDA kernel versions, comma-separated",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--rows", type=int, default=12, help="kernels listed per version")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not ops.HAS_EXTENSION:
        sys.exit("profile_ops.py: needs a GPU and the compiled extension")
    feats, recons, rm, rv, upstream = make_rrs_inputs(
        args.batch_size, "cuda", getattr(torch, args.dtype)
    )

    def step():
        selected, _ = ops.rrs_select(feats, recons, K_MAX, K_MEAN, rm, rv, True)
        torch.autograd.grad(selected, recons, upstream)

    for version in map(int, args.kernels.split(",")):
        with ops.cuda_kernel_version(version):
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        events.sort(key=lambda e: -e.device_time_total)
        total = sum(e.self_device_time_total for e in events)
        print(
            f"\nversion {version}: one forward+backward, {args.dtype}, batch {args.batch_size}: "
            f"{total / 1e3:.3f} ms of kernels"
        )
        for e in events[: args.rows]:
            print(f"  {e.self_device_time_total / 1e3:8.3f} ms  x{e.count:<3d} {e.key[:100]}")


if __name__ == "__main__":
    main()
