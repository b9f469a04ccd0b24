"""What every worker process does before its work, for train and classify alike: pick its device,
take its share of the cores, join the process group torchrun's rendezvous set up."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from distvision.errors import UserError


def pick_device(requested: str, local_workers: int | None = None) -> torch.device:
    """This worker's device: its own GPU (by local rank) on CUDA, else the CPU.

    nccl cannot run two ranks on one GPU, so more local workers than GPUs is a user error.
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested != "cuda":
        return torch.device(requested)
    gpus = torch.cuda.device_count()
    local_workers = local_workers or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if gpus == 0:
        raise UserError("--device cuda: no CUDA GPU is visible here")
    if local_workers > gpus:
        raise UserError(f"{local_workers} workers on this machine need {local_workers} GPUs, it has {gpus}: "
                        f"use --workers {gpus} (or --device cpu)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def set_worker_threads(threads: int | None = None) -> int:
    """Give each local worker its share of the cores (no oversubscription), or exactly `threads`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = threads or max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads


def init_distributed(device: torch.device, timeout_seconds: float) -> tuple[int, int]:
    """Join the process group torchrun's rendezvous set up (or run alone without one)."""
    if "RANK" not in os.environ:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # On CUDA, gradients go over nccl and the small CPU tensors (loss, votes, counts) over gloo.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))
    return dist.get_rank(), dist.get_world_size()
