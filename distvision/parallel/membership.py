"""Who takes part in a round, one small protocol for both recovery modes.

A round is the steps from one exchange of losses and votes to the next (one step when a live job
averages gradients, H local steps under local SGD or DiLoCo). Every round the training loop asks its
membership to `begin_round()` (who takes part: this worker's `Seat`), hands the round's exchange to
`allreduce()`, and asks `commit()` whether the round counts; a round that does not is rolled back
(`Rollback`) and redone by whoever takes part in the next one.

- `StaticMembership`: the torch process group set up by torchrun or the local restart launcher. The
  seat never changes, commit is always true, and a failure raises: torch's elastic agent restarts
  every worker from the newest checkpoint.
- `LiveMembership` (live_membership.py): torchft replicas; quorum, healing and `should_commit`.

Components read the one `Seat` (batches, checkpoints, reporter, faults, audit) instead of copies of
rank and world size, so a new quorum re-seats them all at once.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Seat:
    """This worker's place in the current round: its rank among the participants, and their number."""

    rank: int
    participants: int


class StaticMembership:
    """A fixed process group (torchrun, the local restart path): every round is committed."""

    live = False
    busy = nullcontext()  # live: held while a round or an epoch's end changes the state
    fingerprint = 0  # live: of the weights this round started from; 0 here (DDP keeps replicas equal)

    def __init__(self, seat: Seat):
        self.seat = seat

    def start(self, run, join_timeout: float) -> None:
        """Nothing to share or watch: a fixed group restarts from checkpoints."""

    def epoch_ended(self) -> None:
        """Live membership takes a quorum here."""

    def attempt(self) -> int | None:
        """The audit's attempt id of this round: the one the audit chose at start."""
        return None

    def shutdown(self, run_ended: bool) -> None:
        """Nothing to stop."""

    def finished_without_us(self) -> bool:
        """Live: whether the others finished the run while this replica was away (a fixed group never)."""
        return False

    def begin_round(self) -> float:
        """Nothing to agree on: the group is the membership. Returns the seconds waited (none)."""
        return 0.0

    def allreduce(self, values: torch.Tensor | list[torch.Tensor],
                  while_waiting: Callable[[], None] | None = None) -> bool:
        """Sum `values` (a tensor, or several) over the group in place (a failure raises: the elastic
        agent restarts us). The exchange of votes is small here (gradients went in DDP's hook, which
        loads ahead): nothing waits."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            for tensor in [values] if isinstance(values, torch.Tensor) else values:
                dist.all_reduce(tensor)
        return True

    def exchange(self, summed: list[torch.Tensor], gathered: list[torch.Tensor],
                 while_waiting: Callable[[], None] | None = None,
                 on_group: Sequence[Callable] = ()) -> tuple[bool, list[list[torch.Tensor]]]:
        """The exchange's votes, summed (nothing is gathered, nor run on the group, on a fixed group:
        --quantize is live only, and DDP's hook runs PowerSGD there)."""
        if gathered or on_group:
            raise ValueError("a fixed group only sums: the quantized and low-rank exchanges of a round run "
                             "under live membership")
        return self.allreduce(summed, while_waiting), []

    def commit(self) -> bool:
        return True

    def stepped(self) -> None:
        """A step is done (live membership's watchdog notes the progress)."""

    def agrees(self, fingerprints) -> bool:
        """Whether the replicas started the round from the same weights (a fixed group always does)."""
        return True

    def committed(self, step: int) -> None:
        """A round committed at this optimizer step (live membership logs its events here)."""

    def discarded(self) -> None:
        """Never called: a static round cannot be discarded."""


@dataclass
class Rollback:
    """What a discarded round must undo: the cursor and step, the buffers its forward passes moved
    (batch-norm statistics), and after local steps the weights and optimizer state too."""

    cursor: int
    step: int
    buffers: list[torch.Tensor]
    weights: list[torch.Tensor] | None
    optimizer: dict | None

    @classmethod
    def take(cls, model: nn.Module, optimizer: torch.optim.Optimizer, cursor: int, step: int,
             keep_weights: bool) -> Rollback:
        """A snapshot before the round; weights and optimizer only where the round changes them."""
        buffers = [b.detach().clone() for b in model.buffers()]
        weights = [p.detach().clone() for p in trainable(model)] if keep_weights else None
        saved_optimizer = clone(optimizer.state_dict()) if keep_weights else None
        return cls(cursor, step, buffers, weights, saved_optimizer)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
        """Put model and optimizer back as they were; return the (cursor, step) to redo the round from."""
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), self.buffers, strict=True):
                buffer.copy_(saved)
            for parameter, saved in zip(trainable(model), self.weights or [], strict=False):
                parameter.copy_(saved)
        if self.optimizer is not None:
            optimizer.load_state_dict(self.optimizer)
        return self.cursor, self.step


def weights_fingerprint(tensors: list[torch.Tensor]) -> int:
    """A checksum of tensors (a replica's parameters and buffers), as an integer a float32 holds exactly
    (1..2**24-1; 0 means "not taken"): replicas that should be identical compare it in the exchange."""
    checksum = 0
    for tensor in tensors:
        checksum = zlib.crc32(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy(), checksum)
    return checksum % (2**24 - 1) + 1


def majority_fingerprint(fingerprints) -> int | None:
    """The weights fingerprint the replicas should have (the most common one; on a tie, rank 0's, or
    else the first of the most common), or None when all that were taken (non-zero) agree."""
    taken = [int(value) for value in fingerprints if value]
    if len(set(taken)) <= 1:
        return None
    counts = {value: taken.count(value) for value in taken}
    winners = [value for value, count in counts.items() if count == max(counts.values())]
    first = int(fingerprints[0])
    return first if len(winners) > 1 and first in winners else winners[0]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates (frozen ones never change, so never travel)."""
    return [p for p in model.parameters() if p.requires_grad]


def statistics_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The floating-point buffers (batch-norm running means and variances)."""
    return [b for b in model.buffers() if b.is_floating_point()]


def flatten(tensors: list[torch.Tensor], room: int = 0) -> torch.Tensor:
    """One float32 vector on the CPU of the tensors' values, in order (the exchange's wire layout, for
    gloo), then `room` zeros; float32 CPU tensors are not copied before the one concatenation."""
    return torch.cat([*(t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors), torch.zeros(room)])


def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor], as_grad: bool) -> None:
    """Write consecutive slices of `flat` into the tensors' gradients (as_grad) or their values."""
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            piece = flat[offset:offset + tensor.numel()].view(tensor.shape).to(tensor.device, tensor.dtype)
            offset += tensor.numel()
            if as_grad:  # a view of the round's own buffer, freed with the gradients
                tensor.grad = piece
            else:
                tensor.copy_(piece)
    if offset != flat.numel():
        raise ValueError(f"unflatten_into: {flat.numel()} values for tensors of {offset}")


def clone(tree):
    """A deep copy of a state dict's tensors (a healing peer reads it while this replica trains on)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {key: clone(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(clone(value) for value in tree)
    return tree
