"""DiLoCo's agreed weights, in fragments (--fragments F, Streaming DiLoCo: Douillard et al. 2025).

DiLoCo's outer step needs the weights every replica agreed on at the last synchronisation: a replica's
pseudo-gradient is those weights minus its own after the inner steps. Streaming DiLoCo cuts the model
into F fragments of consecutive parameter tensors and synchronises one fragment per round, in turn, so
that each fragment is synchronised every H steps (a round is H/F steps) and the bytes on the wire at
any one time are a fragment's, not the model's. Between its synchronisations a fragment runs free on
each replica, as the whole model does under DiLoCo; so each fragment keeps its own agreed weights
(its "anchor"), from its own last synchronisation. With one fragment this is DiLoCo as before.

With --overlap T a round's exchange starts T steps before the round ends (parallel/sync.py decides
when, training/exchange.py starts it and waits for it), and the outer step's result is mixed with the
weights those T steps reached; the anchors take the unmixed result, which every replica shares.

A round that ends an epoch synchronises every fragment, so that every replica evaluates and saves the
same weights. The anchors change only when a round commits: a discarded round leaves them as they
were, and is redone from its rollback. A replica that heals takes a peer's anchors and count of rounds
(the count says which fragment is next); a checkpoint holds them too.
"""

from __future__ import annotations

import torch
from torch import nn


def fragment_bounds(sizes: list[int], count: int) -> list[range]:
    """`count` runs of consecutive tensors (by index) covering all of them, each non-empty, cut where the
    running total of values is nearest to an even share (Streaming DiLoCo's fragments are blocks of
    consecutive layers)."""
    if not 1 <= count <= len(sizes):
        raise ValueError(f"cannot cut {len(sizes)} tensors into {count} fragments")
    total, bounds, start, running = sum(sizes), [], 0, 0
    for fragment in range(1, count):
        goal = total * fragment / count
        # the cut after tensor `end - 1`: at least one tensor per fragment, on both sides of it
        end, running_here = start + 1, running + sizes[start]
        while end < len(sizes) - (count - fragment) and abs(running_here + sizes[end] - goal) < abs(running_here - goal):
            running_here += sizes[end]
            end += 1
        bounds.append(range(start, end))
        start, running = end, running_here
    bounds.append(range(start, len(sizes)))
    return bounds


class OuterFragments:
    """The agreed weights of a DiLoCo replica's trainable parameters, and which fragment a round sends."""

    def __init__(self, parameters: list[nn.Parameter], count: int):
        self.parameters = parameters
        self.bounds = fragment_bounds([p.numel() for p in parameters], count)
        self.anchors = [p.detach().clone() for p in parameters]
        self.rounds = 0  # committed rounds: round r sends fragment r mod F

    @property
    def count(self) -> int:
        return len(self.bounds)

    def this_round(self, ends_epoch: bool) -> range:
        """The tensors the round now ending sends: its fragment's, or all of them at an epoch's end."""
        if ends_epoch or self.count == 1:
            return range(len(self.parameters))
        return self.bounds[self.rounds % self.count]

    def values(self, tensors: range) -> int:
        """How many values these tensors hold."""
        return sum(self.parameters[index].numel() for index in tensors)

    def offset(self, tensors: range) -> int:
        """Where these tensors' values start in the whole model's flat vector."""
        return self.values(range(tensors.start))

    def changes(self, tensors: range) -> list[torch.Tensor]:
        """The pseudo-gradient of these tensors: agreed weights minus this replica's."""
        return [self.anchors[index] - self.parameters[index].detach() for index in tensors]

    def rewind(self, tensors: range) -> None:
        """These tensors back to their agreed weights, where the outer step starts from."""
        with torch.no_grad():
            for index in tensors:
                self.parameters[index].copy_(self.anchors[index])

    def committed(self, tensors: range) -> None:
        """The round's outer step on these tensors is done: their weights are the agreed ones now."""
        self.take_agreed(tensors)
        self.rounds += 1

    def take_agreed(self, tensors: range) -> None:
        """These tensors' weights, alike on every replica now, are the agreed ones."""
        with torch.no_grad():
            for index in tensors:
                self.anchors[index].copy_(self.parameters[index])

    def settle(self) -> None:
        """Every tensor to its agreed weights (a run that ends between synchronisations: the replicas'
        own drift since then differs, the agreed weights do not)."""
        self.rewind(range(len(self.parameters)))

    def agreed(self) -> list[torch.Tensor]:
        """The tensors every replica holds alike at a round's start (compared at quorums)."""
        return self.anchors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rounds": torch.tensor(self.rounds), **{f"anchor.{i}": a for i, a in enumerate(self.anchors)}}

    def load(self, saved: dict[str, torch.Tensor] | None) -> None:
        """A peer's or a checkpoint's anchors and count; None (a checkpoint from before fragments, or of
        one fragment): the weights just loaded are the agreed ones."""
        if not saved:
            self.anchors = [p.detach().clone() for p in self.parameters]
            self.rounds = 0
            return
        expected = {f"anchor.{i}" for i in range(len(self.anchors))} | {"rounds"}
        if set(saved) != expected:
            raise ValueError("the saved DiLoCo fragments do not match this model")
        for index, anchor in enumerate(self.anchors):
            anchor.copy_(saved[f"anchor.{index}"])
        self.rounds = int(saved["rounds"])
