"""PowerSGD under live membership: torch's own powerSGD_hook, run over the round's replica group.

On a fixed group DDP runs the hook on each gradient bucket (sync.py). A live replica has no DDP: a
round's gradients are one flat vector that the exchange hands to the membership. torch's hook reads
its bucket only through buffer(), index(), gradients() and is_last(), so FlatBucket, those four over
the flat vector, runs it unchanged, collectives and all, on the group torchft configured for the
quorum (live.py's on_group).

What the hook keeps between rounds is this replica's state, and a discarded round must not change
it: the error feedback (what compression left out of this replica's gradients), the warm-started Q
(each round's approximation starts from the last one's), and the count of iterations, which decides
what the hook sends (the first start_powerSGD_iter rounds the gradients whole, then P and Q: replicas
whose counts differ would run different collectives). LowRankGradients snapshots them before each
round's hook and puts them back unless the round commits. A healing replica takes the count and Q
from its peer (with a fresh Q its first round would sum Ps of different bases: the same result on
every replica, but a poorer approximation), and starts with no error feedback: the error it owed
belongs to weights it no longer has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

BUCKET = 0  # the one bucket: the state's dictionaries are keyed by bucket index
START_ITERATIONS = 2  # exchanged whole before compression starts, as on the restart path (sync.py)


@dataclass
class FlatBucket:
    """The GradBucket interface torch's PowerSGD hook reads, over one flat gradient vector."""

    flat: torch.Tensor
    shapes: list[torch.Size]

    def buffer(self) -> torch.Tensor:
        return self.flat

    def index(self) -> int:
        return BUCKET

    def is_last(self) -> bool:
        return True

    def gradients(self) -> list[torch.Tensor]:
        """Each parameter's gradient, a view of the flat vector (the hook writes its result through them)."""
        views, offset = [], 0
        for shape in self.shapes:
            count = shape.numel()
            views.append(self.flat[offset : offset + count].view(shape))
            offset += count
        return views


def wire_bytes(shapes: list[torch.Size], rank: int, iteration: int,
               min_compression_rate: float = 2.0) -> int:
    """Bytes one replica hands to the collectives for one round: everything in float32 before
    compression starts; then P and Q of each matrix the hook compresses (torch's own test of whether
    it pays) and the rest whole."""
    if iteration < START_ITERATIONS:
        return 4 * sum(shape.numel() for shape in shapes)
    total = 0
    for shape in shapes:
        rows = shape[0] if len(shape) else 1
        cols = shape.numel() // rows
        low = min(rows, cols, rank)
        compress, _, _ = powerSGD_hook._should_compress(rows, cols, low, min_compression_rate)
        total += (rows + cols) * low if compress else rows * cols
    return 4 * total


class LowRankGradients:
    """One replica's PowerSGD: its state, the hook's run over a round's group, and the round's fate."""

    def __init__(self, shapes: list[torch.Size], rank: int):
        self.shapes, self.rank = shapes, rank
        self.state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                                 start_powerSGD_iter=START_ITERATIONS, use_error_feedback=True,
                                                 warm_start=True)
        self._before: dict | None = None  # the state as the pending round found it
        self.group_size = 1  # of the last round's group: the hook averages, the exchange sums

    def begin(self) -> None:
        """A round's exchange is next: keep the state it finds, or, where the last round was not
        committed, go back to the state that round found."""
        if self._before is None:
            self._before = self._snapshot()
        else:
            self._restore(self._before)

    def reduce(self, flat: torch.Tensor, group) -> torch.futures.Future:
        """Start the hook on `flat` (this replica's gradients) over `group`; the future's value is `flat`
        holding the participants' average. Unless commit() follows, the next begin() undoes it."""
        self.state.process_group = group
        self.group_size = group.size()
        return powerSGD_hook.powerSGD_hook(self.state, FlatBucket(flat, self.shapes))

    def bytes_this_round(self) -> int:
        return wire_bytes(self.shapes, self.rank, self.state.iter)

    def commit(self) -> None:
        """The round counts: the state it left is the state."""
        self._before = None
        self.state.process_group = None

    def healed(self) -> None:
        """This replica took a peer's weights (and, through state_dict, its Q and count): its own error
        feedback is void."""
        self.state.error_dict.clear()
        self._before = None

    def state_dict(self) -> dict:
        """What a healing peer needs: the count of iterations, the warm-started Q and P's memory (which the
        hook allocates with Q's; empty tensors before the first compressed round)."""
        memory = {name: getattr(self.state, name).get(BUCKET) for name in ("q_memory_dict", "p_memory_dict")}
        return {"iter": self.state.iter,
                **{name: (tensor.clone() if tensor is not None else torch.zeros(0)) for name, tensor in memory.items()}}

    def load(self, saved: dict) -> None:
        self.state.iter = int(saved["iter"])
        for name in ("q_memory_dict", "p_memory_dict"):
            getattr(self.state, name).clear()
            if saved[name].numel():
                getattr(self.state, name)[BUCKET] = saved[name].clone()
        self.healed()

    # The hook reads the error feedback it finds and puts a new tensor in its place, so a snapshot may keep
    # that tensor itself; Q and P it overwrites in place (the all-reduce, the orthogonalisation, P = M Q),
    # so those are copied. One gradient-sized copy a round fewer than copying all three.
    _REPLACED, _OVERWRITTEN = ("error_dict",), ("q_memory_dict", "p_memory_dict")

    def _snapshot(self) -> dict:
        state = self.state
        return {"iter": state.iter, "rng": state.rng.get_state(),
                **{name: dict(getattr(state, name)) for name in self._REPLACED},
                **{name: {k: v.clone() for k, v in getattr(state, name).items()} for name in self._OVERWRITTEN}}

    def _restore(self, saved: dict) -> None:
        self.state.iter = saved["iter"]
        self.state.rng.set_state(saved["rng"])  # the first compressed round draws Q's seed from it
        for name in self._REPLACED:
            setattr(self.state, name, dict(saved[name]))
        for name in self._OVERWRITTEN:
            setattr(self.state, name, {k: v.clone() for k, v in saved[name].items()})
