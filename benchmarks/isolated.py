"""Run one measurement in a fresh process, so that one variant's memory (and compiled
caches, and allocator state) cannot inflate or speed up the next one's."""

import multiprocessing as mp


def in_fresh_process(worker, spec):
    """worker(spec, queue) puts one result on the queue; returns that result.
    "spawn", not "fork": the child starts without the parent's tensors and threads."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=worker, args=(spec, queue))
    process.start()
    result = queue.get()
    process.join()
    return result
