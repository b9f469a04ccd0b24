"""How replicas stay in step. This is the one place a synchronisation mode is chosen.

"allreduce": synchronous data parallelism, gradients averaged every step by DistributedDataParallel
(the Pattern Parallel Training of Dahl et al. 2008 with the weight changes combined every step).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distvision.errors import UserError

SYNC_MODES = ("allreduce",)


def wrap_for_sync(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """Wrap the replica so that backward() leaves the synchronised gradient on every rank."""
    if mode not in SYNC_MODES:
        raise UserError(f"unknown synchronisation mode {mode!r}; choose from {', '.join(SYNC_MODES)}")
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain replica inside any wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model
