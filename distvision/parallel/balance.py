"""Balancing batch size: learning-rate scaling to the global batch, and per-worker batch shares.

With `--balance throughput` the global batch stays the same, but each worker's slice of it follows
its measured speed, so a slower worker no longer holds the others back at every step. The loss is
a sum scaled by world / global batch (train.py), so the combined gradient is still exactly that of
the whole global batch, however unevenly it is split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MEASURE_STEPS = 5  # steps of timing before the first re-split
REBALANCE_EVERY = 50  # steps between later re-splits, so drifting speeds are followed
# Re-split only when a share would move by more than this. Shares proportional to speed reach equal
# step times only over several re-splits (per-step costs that do not shrink with a share make a
# worker look faster at a smaller share than it is), and a coarse threshold stopped them early: at
# 0.05, one of two workers slowed to half speed stopped at 0.30 after two re-splits, still the
# slower, and gained clearly less over an even split than at 0.02 (benchmarks/RESULTS.md).
REBALANCE_THRESHOLD = 0.02


def scaled_lr(lr: float, global_batch: int, base_batch: int, rule: str) -> float:
    """The lr given for base_batch, scaled to global_batch (Goyal et al. 2017: linear; or sqrt)."""
    ratio = global_batch / base_batch
    return lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


def warmup_factor(progress_epochs: float, warmup_epochs: float) -> float:
    """Linear warmup from near zero to 1 over the first warmup_epochs (1 without warmup)."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (progress_epochs + 1e-3) / warmup_epochs)


def split_sizes(total: int, shares: np.ndarray) -> np.ndarray:
    """Integer slice sizes summing to total, proportional to shares, each at least 1."""
    shares = np.asarray(shares, dtype=np.float64) / np.sum(shares)
    raw = shares * total
    sizes = np.maximum(np.floor(raw).astype(np.int64), 1)
    while sizes.sum() > total:  # the minimum of 1 overshot: take from the largest
        sizes[np.argmax(sizes)] -= 1
    # Hand out the remainder to the largest deficits; a worker raised to the minimum has none left.
    order = np.argsort(-(raw - sizes), kind="stable")
    for i in range(total - int(sizes.sum())):
        sizes[order[i % len(sizes)]] += 1
    return sizes


def weighted_slice(batch: np.ndarray, rank: int, shares: np.ndarray) -> np.ndarray:
    """This rank's contiguous slice of one global batch when ranks take unequal shares."""
    sizes = split_sizes(len(batch), shares)
    start = int(sizes[:rank].sum())
    return batch[start : start + int(sizes[rank])]


@dataclass
class ThroughputBalancer:
    """Per-worker shares from measured seconds per sample. Fed identical numbers on every rank (the
    small all-reduce of losses and votes carries each rank's compute time), so every rank computes
    the same shares."""

    world_size: int
    enabled: bool
    shares: np.ndarray = field(init=False)
    _seconds: np.ndarray = field(init=False)
    _samples: np.ndarray = field(init=False)
    _steps: int = 0
    _resplits: int = 0
    _warmed_up: bool = False

    def __post_init__(self) -> None:
        self.shares = np.full(self.world_size, 1.0 / self.world_size)
        self._seconds = np.zeros(self.world_size)
        self._samples = np.zeros(self.world_size)

    def resize(self, participants: int) -> None:
        """Live: a quorum changed how many workers take part. Their speeds are measured again from even
        shares (every replica sees the same quorum, so all start over alike)."""
        if participants != self.world_size:
            self.world_size = participants
            self._steps, self._resplits, self._warmed_up = 0, 0, False
            self.__post_init__()

    def state_dict(self) -> dict:
        """What a healing peer takes over, so that every replica cuts the same shares (JSON values)."""
        return {"world_size": self.world_size, "shares": self.shares.tolist(), "seconds": self._seconds.tolist(),
                "samples": self._samples.tolist(), "steps": self._steps, "resplits": self._resplits,
                "warmed_up": self._warmed_up}

    def load(self, saved: dict) -> None:
        self.world_size, self._steps, self._resplits, self._warmed_up = (
            int(saved["world_size"]), int(saved["steps"]), int(saved["resplits"]), bool(saved["warmed_up"]))
        self.shares, self._seconds, self._samples = (np.asarray(saved[key], dtype=np.float64)
                                                     for key in ("shares", "seconds", "samples"))

    def observe(self, compute_seconds: np.ndarray, samples: np.ndarray, steps: int = 1) -> bool:
        """Add the per-rank compute times and sample counts of the last `steps` steps; True when the
        shares changed."""
        if not self.enabled or self.world_size == 1:
            return False
        if not self._warmed_up:  # the first observation carries one-off costs (kernel selection, DDP's buckets)
            self._warmed_up = True
            return False
        self._seconds += compute_seconds
        self._samples += samples
        self._steps += steps
        window = MEASURE_STEPS if self._resplits == 0 else REBALANCE_EVERY
        if self._steps < window:
            return False
        speed = self._samples / np.maximum(self._seconds, 1e-9)  # samples per second, per rank
        wanted = speed / speed.sum()
        self._seconds[:], self._samples[:], self._steps = 0, 0, 0
        self._resplits += 1
        if np.max(np.abs(wanted - self.shares)) <= REBALANCE_THRESHOLD:
            return False
        self.shares = wanted
        return True
