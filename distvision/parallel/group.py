"""Leaving the process group without the teardown deadlock gloo can hit.

Each gloo collective is finished on one of gloo's worker threads, which then frees the work's
captured thread-local state; that holds Python objects, so the thread takes the GIL to free it.
The process group itself is freed later by whoever drops the last reference (destroy_process_group,
or DDP's reducer when the model goes), and its destructor joins those threads while holding the
GIL. A thread still waiting for the GIL then never ends: in a two-process test that called
destroy_process_group right after its last collective, 1 start in 5 hung forever.
"""

from __future__ import annotations

import time

import torch.distributed as dist

# Long enough for a worker thread that waits for the GIL to get it and finish; sleeping releases it.
SETTLE_SECONDS = 0.05


def leave_process_group(barrier: bool = True) -> None:
    """Wait for every worker (if barrier), let gloo's threads finish, then destroy the group."""
    if not dist.is_initialized():
        return
    if barrier:
        dist.barrier()
    time.sleep(SETTLE_SECONDS)
    dist.destroy_process_group()
