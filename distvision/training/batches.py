"""The batches a rank trains on in one epoch: the world-size-free cursor, sharding, balancing, prefetch."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from distvision.data.batches import BatchPrefetcher
from distvision.data.sharding import epoch_permutation, global_batches, rank_slice
from distvision.parallel.balance import ThroughputBalancer, weighted_slice
from distvision.parallel.membership import Seat


@dataclass
class StepBatch:
    """One step's data: the global batch's sample indices, this rank's share, its inputs and labels."""

    index: int  # of the batch among those left in the epoch
    global_indices: np.ndarray
    local_indices: np.ndarray
    inputs: torch.Tensor
    labels: torch.Tensor
    last: bool  # the epoch's last step

    @property
    def global_size(self) -> int:
        return len(self.global_indices)


@dataclass
class EpochBatches:
    """Cuts each epoch's seeded permutation, from the cursor on, into global batches identical on every
    rank, and yields this rank's share of each, loaded (and augmented) by the prefetcher."""

    train_indices: np.ndarray
    labels: np.ndarray
    global_batch_size: int
    seed: int
    seat: Seat  # this round's rank among the participants: whose share is cut
    balancer: ThroughputBalancer
    prefetcher: BatchPrefetcher
    device: torch.device
    _order: tuple[int, np.ndarray] | None = field(default=None, init=False, repr=False)  # (epoch, permutation)

    def share(self, batch: np.ndarray) -> np.ndarray:
        """This rank's slice of a global batch, as the balancer splits it now."""
        if self.balancer.enabled:
            return weighted_slice(batch, self.seat.rank, self.balancer.shares)
        return rank_slice(batch, self.seat.rank, self.seat.participants)

    def remaining(self, epoch: int, cursor: int) -> list[np.ndarray]:
        """The epoch's global batches not yet trained."""
        if self._order is None or self._order[0] != epoch:  # once an epoch: a round asks at every exchange
            self._order = (epoch, self.train_indices[epoch_permutation(self.seed, epoch, len(self.train_indices))])
        return global_batches(self._order[1][cursor:], self.global_batch_size, self.seat.participants)

    def load(self, epoch: int, batches: list[np.ndarray]) -> Iterator[StepBatch]:
        """This rank's share of each of the epoch's global batches, loaded.

        Each share is cut when its step comes, so a re-split by the balancer applies from the next step.
        """
        for index, batch in enumerate(batches):
            local = self.share(batch)
            inputs = self.prefetcher.take(local, epoch)
            if index + 1 < len(batches):  # loaded while this step's gradients are exchanged
                self.prefetcher.prefetch(self.share(batches[index + 1]), epoch)
            labels = torch.from_numpy(self.labels[local]).to(self.device)
            yield StepBatch(index, batch, local, inputs, labels, last=index == len(batches) - 1)
