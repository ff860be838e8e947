"""--precision fp32 | bf16 | fp16: the arithmetic the networks run in.

Lower precision runs the networks under `torch.autocast`: convolutions and matrix products
in bfloat16 or float16, while the parts that need float32 stay in it (GroupNorm, the
softmax of the anomaly map, both losses, the RRS residual on the CPU; see model.py and
ops.py). Weights and optimiser state stay float32.

- fp32: the paper's setting and the default.
- bf16: float32's range with 8 bits of mantissa (relative error ~0.4 % per value). No loss
  scaling is needed. On a CPU with AVX512-BF16 or AMX it is faster; on older CPUs slower.
- fp16: CUDA only (CPU autocast in float16 is slow and partial). More mantissa than bf16,
  less range: training scales the loss (`torch.amp.GradScaler`) so small gradients do not
  underflow.
"""

import contextlib

import torch

from .cli import UserError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_precision_arg(parser, what, flag="--precision"):
    """--precision (or `flag`), documented with `what` the stage runs in it."""
    parser.add_argument(
        flag,
        default="fp32",
        choices=list(PRECISIONS),
        help=f"arithmetic of {what}: fp32 (paper) | bf16 (autocast) | fp16 (autocast, CUDA only)",
    )


def check_precision(precision, device, flag="--precision"):
    """fp16 needs CUDA: refuse it on the CPU before any work."""
    if precision == "fp16" and device.type != "cuda":
        raise UserError(
            f"{flag} fp16 needs a CUDA device (--device is {device}); "
            "on the CPU use --precision bf16 or fp32"
        )


def autocast(precision, device):
    """The context the networks run in: torch.autocast in bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def grad_scaler(precision, device):
    """Loss scaling for fp16 training (a no-op object otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
