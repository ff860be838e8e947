"""Starting data loaders, in one place for every stage.

A `torch.utils.data.DataLoader` with --workers processes decodes images beside the main
process. More workers than CPU cores compete for them, and more workers than batches have
nothing to do but start (each one a copy of the process): `start_loader` caps the number
and says so in one line. An error raised in a worker (a `UserError` naming an unreadable
file) reaches the main process wrapped by torch in a message with two tracebacks;
`cli.run` prints the original line (`cli.worker_error_line`).
"""

import os

import torch


def cpu_count():
    """The CPU cores this process may use (its affinity, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def useful_workers(workers, batches=None, cores=None):
    """--workers capped to the CPU cores and to the number of batches (None: unknown)."""
    limit = min(workers, cores or cpu_count())
    return limit if batches is None else min(limit, batches)


def capped_workers(workers, batches=None, log=print):
    """`useful_workers`, with one line when --workers is capped."""
    used = useful_workers(workers, batches)
    if used < workers:
        known = "" if batches is None else f"{batches} batch(es), "
        log(f"note: --workers {workers} capped to {used} ({known}{cpu_count()} CPU core(s))")
    return used


def start_loader(dataset, workers, log=print, **options):
    """DataLoader(dataset, num_workers=workers, **options) with `workers` capped by
    `capped_workers`. `options`: batch_size, sampler, batch_sampler, pin_memory, ... as
    DataLoader takes them; persistent_workers only when there are any workers."""
    persistent = options.pop("persistent_workers", False)
    batches = len(torch.utils.data.DataLoader(dataset, **options))  # starts no process
    used = capped_workers(workers, batches, log)
    if persistent and used > 0:
        options["persistent_workers"] = True
    return torch.utils.data.DataLoader(dataset, num_workers=used, **options)


def training_loader(stream, start_step, total_steps, batch_size, workers, ddp):
    """train_realnet.py's batches of the anomaly stream: this process's share (batch_size /
    processes) of each global batch, from start_step."""
    from .stream import StreamSampler

    sampler = StreamSampler(start_step, total_steps, batch_size, ddp.rank, ddp.world_size)
    return torch.utils.data.DataLoader(
        stream,
        batch_size=batch_size // ddp.world_size,
        num_workers=workers,
        sampler=sampler,
        pin_memory=ddp.device.type == "cuda",
    )
