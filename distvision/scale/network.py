"""Networks for the performance model: parsed from `--network 10gbit,50us`, or measured here.

A ring all-reduce of P bytes over n workers takes 2(n-1) hops, each paying the latency, and puts
2(n-1)/n x P bytes on every worker's link; that is how the model scales communication with n. A
quantized exchange (--quantize) gathers its codes instead, since sums of codes would overflow: a ring
all-gather takes n-1 hops and puts (n-1) x P on each link (P the worker's own codes), after the
all-reduce of the round's small float32 part (its hops, its bytes within P). With 2 workers both send
P; beyond 2, gathering costs more per byte than summing.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from distvision.errors import UserError

_BANDWIDTH_UNITS = {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "kb": 1e3, "mb": 1e6, "gb": 1e9}
_LATENCY_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
PROBE_SIZES = (256, 4096, 65536, 262144, 1048576)  # float32 elements: 1 KB to 4 MB
PROBE_REPEATS = 15


@dataclass(frozen=True)
class Network:
    latency: float  # seconds per hop
    seconds_per_byte: float
    name: str

    def exchange_seconds(self, workers: int, payload_bytes: float, gathered: bool = False) -> float:
        """One synchronisation of payload_bytes among `workers`: a ring all-reduce, or (gathered) the
        quantized exchange's all-gather (nothing to do alone)."""
        return hops(workers, gathered) * self.latency + wire_bytes(workers, payload_bytes, gathered) * self.seconds_per_byte


def hops(workers: int, gathered: bool = False) -> int:
    """Latency-paying steps of one synchronisation: a ring all-reduce's 2(n-1), plus the all-gather's n-1."""
    return (3 if gathered else 2) * (workers - 1) if workers > 1 else 0


def wire_bytes(workers: int, payload_bytes: float, gathered: bool = False) -> float:
    """Bytes each worker sends in a ring all-reduce of payload_bytes, or in an all-gather of them."""
    if workers <= 1:
        return 0.0
    return (workers - 1) * payload_bytes if gathered else 2 * (workers - 1) / workers * payload_bytes


def parse_network(text: str) -> Network:
    """'10gbit,50us' -> Network. Bandwidth in kbit/mbit/gbit (per second) or kb/mb/gb (bytes per second);
    latency in ns/us/ms/s, default 0."""
    parts = [part.strip().lower() for part in text.split(",")]
    bandwidth = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]+?)(?:/s|ps)?", parts[0])
    if len(parts) > 2 or not bandwidth or bandwidth.group(2) not in _BANDWIDTH_UNITS or float(bandwidth.group(1)) <= 0:
        raise UserError(f"--network {text!r}: expected BANDWIDTH[,LATENCY], e.g. 10gbit,50us or 100mbit,1ms "
                        f"(bandwidth units {'/'.join(_BANDWIDTH_UNITS)}, latency units {'/'.join(_LATENCY_UNITS)})")
    latency = 0.0
    if len(parts) == 2:
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]+)", parts[1])
        if not match or match.group(2) not in _LATENCY_UNITS:
            raise UserError(f"--network {text!r}: the latency {parts[1]!r} needs a unit: ns, us, ms or s (e.g. 50us)")
        latency = float(match.group(1)) * _LATENCY_UNITS[match.group(2)]
    bytes_per_second = float(bandwidth.group(1)) * _BANDWIDTH_UNITS[bandwidth.group(2)]
    return Network(latency, 1.0 / bytes_per_second, text)


def _probe_worker(rank: int, init_file: str, results: str) -> None:
    import torch
    import torch.distributed as dist

    from distvision.parallel.group import leave_process_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    rows = []
    for size in PROBE_SIZES:
        tensor = torch.ones(size)
        times = []
        for repeat in range(PROBE_REPEATS + 3):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(tensor)
            if repeat >= 3:  # the first exchanges set up buffers and connections
                times.append(time.perf_counter() - started)
        rows.append((size * 4, min(times)))  # the fastest exchange: the network, not the machine's other load
    if rank == 0:
        Path(results).write_text("\n".join(f"{size} {seconds}" for size, seconds in rows))
    leave_process_group(barrier=False)


def measure_local_network() -> Network:
    """Latency and bandwidth of gloo between two local processes (the transport the measured runs used).

    Two ranks: 2 hops and payload-sized traffic per all-reduce, so time = 2 x latency + bytes x seconds/byte.
    """
    import numpy as np
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="distvision-probe-") as folder:
        results = Path(folder) / "results"
        mp.spawn(_probe_worker, args=(str(Path(folder) / "init"), str(results)), nprocs=2, join=True)
        sizes, seconds = np.loadtxt(results, unpack=True)
    slope, intercept = np.polyfit(sizes, seconds, 1)
    return Network(max(float(intercept) / 2, 0.0), max(float(slope), 1e-12), "measured here (gloo, 2 local processes)")
