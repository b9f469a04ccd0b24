"""How much launching the gradients' all-reduce in buckets during backward could save: the room for overlap.

    python benchmarks/overlap_room.py --models fastnet,resnet18

Live membership all-reduces a step's gradients in one exchange after backward. Launching it in buckets
from post-accumulate hooks (as DDP does) would hide at most the exchange's own transfer time behind
backward. Per model this measures, on this machine, with 2 gloo processes over loopback and one thread
each (as 2 local workers run): the forward and backward of one worker's share of the recipe's global
batch (fp32, channels_last; the median of 5 after 2 warm-up steps), and the all-reduce of a float32
vector of the model's gradient size (the fastest of 10 after 3 warm-ups: the transport, not the
peer's jitter). The ratio is the most bucketing could cut from a step. Run nothing beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # distvision from this tree

from distvision.models.registry import create, get_entry


def _allreduce_seconds(rank: int, values: int, init_file: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    vector, times = torch.ones(values), []
    for repeat in range(13):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(vector)
        if repeat >= 3:
            times.append(time.perf_counter() - started)
    if rank == 0:
        Path(results).write_text(str(min(times)))
    dist.destroy_process_group()


def allreduce_seconds(values: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        init_file, results = os.path.join(folder, "init"), os.path.join(folder, "seconds")
        mp.spawn(_allreduce_seconds, args=(values, init_file, results), nprocs=2)
        return float(Path(results).read_text())


def step_seconds(model: torch.nn.Module, batch: int) -> float:
    torch.set_num_threads(1)
    model = model.to(memory_format=torch.channels_last).train()
    images = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,))
    times = []
    for repeat in range(7):
        started = time.perf_counter()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        if repeat >= 2:
            times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="fastnet,resnet18")
    args = parser.parse_args()
    print("| model | gradient MB | worker's batch | forward+backward s | all-reduce s | most bucketing saves |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = create(name)
        values = sum(p.numel() for p in model.parameters() if p.requires_grad)
        batch = get_entry(name).recipe.batch_size // 2
        compute, exchange = step_seconds(model, batch), allreduce_seconds(values)
        print(f"| {name} | {values * 4 / 1e6:.1f} | {batch} | {compute:.3f} | {exchange:.4f} | "
              f"{exchange / (compute + exchange):.1%} |", flush=True)


if __name__ == "__main__":
    main()
