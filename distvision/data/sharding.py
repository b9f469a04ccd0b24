"""Which samples each rank trains on: a seeded per-epoch permutation cut into global batches.

Global batch k of an epoch is perm[k*B : (k+1)*B]; each rank takes a contiguous slice of it
(sizes differ by at most one). So every sample is seen exactly once per epoch over all ranks,
whatever the world size, and every rank runs the same number of steps (no deadlock on an uneven
last batch). A last batch with fewer samples than ranks is folded into the batch before it, so
no rank ever gets an empty batch and no sample is dropped.
"""

from __future__ import annotations

import numpy as np


def epoch_permutation(seed: int, epoch: int, sample_count: int) -> np.ndarray:
    """The order of all training samples in this epoch; the same on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(sample_count)


def global_batches(permutation: np.ndarray, global_batch_size: int, world_size: int) -> list[np.ndarray]:
    """Cut the permutation into global batches; a tail too small to feed every rank joins the last one."""
    batches = [permutation[i : i + global_batch_size] for i in range(0, len(permutation), global_batch_size)]
    if len(batches) > 1 and len(batches[-1]) < world_size:
        tail = batches.pop()
        batches[-1] = np.concatenate([batches[-1], tail])
    return batches


def rank_slice(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's contiguous share of one global batch (sizes differ by at most one)."""
    base, extra = divmod(len(batch), world_size)
    start = rank * base + min(rank, extra)
    return batch[start : start + base + (1 if rank < extra else 0)]


def evaluation_share(sample_count: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's contiguous share of an evaluation set; together the ranks cover it exactly once."""
    return rank_slice(np.arange(sample_count), rank, world_size)
