"""torchrun support: every training/sampling stage runs single-process by default and
under `torchrun --nproc_per_node N` without code changes (NCCL on GPU, gloo on CPU).

The authors' scripts *require* a distributed launcher even on one GPU (their issue #31);
here `setup()` only initialises a process group when torchrun's variables are present.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .cli import UserError, resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def setup(device_arg="auto"):
    """Initialise from torchrun's environment variables (if any) and pick the device.

    device_arg: "auto" (CUDA if available), "cpu" or "cuda" (checked by cli.resolve_device);
    under torchrun each process takes the GPU of its LOCAL_RANK.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device_arg).type == "cuda"
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def require_divisible_batch(batch_size, info):
    """--batch-size is the global batch: a positive multiple of the number of processes."""
    if batch_size < 1 or batch_size % info.world_size:
        raise UserError(
            f"--batch-size {batch_size} must be a positive multiple of the "
            f"{info.world_size} processes"
        )


def barrier(info):
    if info.enabled:
        dist.barrier()


def cleanup(info):
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tensor, info):
    """Mean of `tensor` over ranks (returns a new tensor; identity single-process)."""
    if not info.enabled:
        return tensor
    t = tensor.clone()
    dist.all_reduce(t)
    return t / info.world_size


def require_finite(loss, step, lr, out, info):
    """train_realnet.py: stop every process together when the loss is not finite; nothing
    is saved from here on, so OUT keeps the last good state."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if all_reduce_mean(finite, info).item() < 1:
        raise UserError(
            f"step {step}: the loss is not finite ({loss.item()}); lower --lr "
            f"(now {lr}); {out} keeps the last saved step"
        )
