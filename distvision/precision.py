"""Choose the numeric precision by measuring it: which of fp32 and bf16 autocast trains faster.

The answer differs between CPUs (either can win by a wide margin: bf16 on CPUs with native bf16
units, fp32 on those without; benchmarks/RESULTS.md), so `auto` times a few real training steps of
both and caches the result per CPU model, network, batch size and thread count.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

PRECISIONS = ("auto", "bf16", "fp32")
PROBE_WARMUP_STEPS = 2
PROBE_TIMED_STEPS = 3


def autocast(precision: str, device: torch.device):
    """The autocast context for a precision ("fp32" means none)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time_steps(model: nn.Module, precision: str, batch_size: int, image_size: int, device: torch.device) -> float:
    """Seconds per training step of a throwaway copy of the model on random data."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, 2, (batch_size,), device=device)
    elapsed = 0.0
    for step in range(PROBE_WARMUP_STEPS + PROBE_TIMED_STEPS):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with autocast(precision, device):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= PROBE_WARMUP_STEPS:
            elapsed += time.perf_counter() - started
    return elapsed / PROBE_TIMED_STEPS


def precision_cache_file(cache_dir: Path, model_name: str, image_size: int, local_batch_size: int) -> tuple[Path, str]:
    """Where the choice for this CPU model, network, input, batch, thread count and torch is kept, and its key."""
    threads = torch.get_num_threads()
    key_text = f"{cpu_model_name()}|{model_name}|{image_size}|{local_batch_size}|{threads}|{torch.__version__}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    return cache_dir / "precision" / f"{key}.json", key_text


def choose_precision(
    requested: str,
    model: nn.Module,
    model_name: str,
    local_batch_size: int,
    image_size: int,
    device: torch.device,
    cache_dir: Path,
) -> tuple[str, str]:
    """Return (precision, how it was chosen). Every rank gets the same answer."""
    if requested != "auto":
        return requested, "requested"
    if device.type == "cuda":
        return ("bf16", "cuda supports bf16") if torch.cuda.is_bf16_supported() else ("fp32", "no bf16 on GPU")
    cache_file, key_text = precision_cache_file(cache_dir, model_name, image_size, local_batch_size)
    cached, cached_how = None, ""
    if cache_file.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError):
            record = json.loads(cache_file.read_text())
            cached, cached_how = record["precision"], record.get("how", "")
    # Ranks may disagree about the cache (separate machines): probe unless every rank has an answer.
    have_answer = torch.tensor([1.0 if cached in ("fp32", "bf16") else 0.0])
    if dist.is_initialized():
        dist.all_reduce(have_answer, op=dist.ReduceOp.MIN)
    if have_answer.item() == 1.0:
        vote = torch.tensor([1.0 if cached == "bf16" else 0.0])
        if dist.is_initialized():
            dist.all_reduce(vote, op=dist.ReduceOp.MIN)  # bf16 only where every node found it faster
        return ("bf16" if vote.item() == 1.0 else "fp32"), f"cached, {cached_how}"
    # Every rank probes at once, as in training, and the slowest rank's times decide.
    probe_batch = min(local_batch_size, 128)
    times = torch.tensor(
        [_time_steps(model, p, probe_batch, image_size, device) for p in ("fp32", "bf16")], dtype=torch.float64
    )
    if dist.is_initialized():
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
    fp32_seconds, bf16_seconds = times.tolist()
    choice = "bf16" if bf16_seconds < fp32_seconds else "fp32"
    how = f"measured: fp32 {probe_batch / fp32_seconds:.0f} img/s, bf16 {probe_batch / bf16_seconds:.0f} img/s per worker"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        with contextlib.suppress(OSError):
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"precision": choice, "key": key_text, "how": how}))
            os.replace(tmp, cache_file)
    return choice, how
