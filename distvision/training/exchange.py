"""The exchange that ends a round: the global loss, the decisions every rank must share, the
per-rank timings the throughput balancer needs and (live) each replica's weight fingerprint, packed in
one tensor and read by name.

On a fixed group gradients travel in the synchroniser's own collectives (DDP), and this exchange
carries only what the loop needs to agree on (stop, checkpoint, diverged) and to report (loss), so
it runs when the synchroniser says it is due (paced to about once a second) rather than every step.
Under live membership the round's payload (gradients, parameters or pseudo-gradients) travels in the
same all-reduce, and the round counts only if the membership commits it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from distvision.parallel.membership import Seat, StaticMembership
from distvision.parallel.sync import Synchronizer, Wire

# Slots summed over ranks, in order. Decisions are votes: > 0 means at least one rank voted yes.
SUMMED = ("loss_sum", "samples", "stop_votes", "diverged_votes", "checkpoint_due", "time_up",
          "seconds_since_last")


@dataclass
class ExchangeResult:
    """What every rank knows after the exchange, identical everywhere."""

    loss_sum: float  # over all workers' samples since the last exchange
    samples: int
    stop_votes: float
    diverged_votes: float
    checkpoint_due: float  # rank 0's checkpoint clock says it is time
    time_up: float  # rank 0's training clock reached --max-time
    seconds_since_last: float  # rank 0's wall time since the last exchange
    compute_seconds: np.ndarray  # per rank, since the last exchange
    samples_by_rank: np.ndarray
    fingerprints: np.ndarray  # per rank, of the weights the round started from (0: not taken this round)
    steps: int  # since the last exchange, this one's included
    payload: torch.Tensor | None = None  # live: the participants' summed payload

    def stop_reason(self) -> str | None:
        """Why every rank stops now, if it does: a diverged replica first, then a stop request, then time."""
        if self.diverged_votes:
            return "diverged"
        if self.stop_votes:
            return "stopped"
        if self.time_up:
            return "max_time"
        return None


class StepExchange:
    """This rank's losses, sample counts and compute time since the last exchange, and the exchange."""

    def __init__(self, seat: Seat, sync: Synchronizer, membership: StaticMembership | None = None):
        self.seat, self.sync = seat, sync
        self.membership = membership or StaticMembership(seat)
        self.in_flight = None  # --overlap: (wire, payload, wait) of the round's payload sent early
        self.launches = 0  # rounds whose payload this replica sent early (summary.json's overlapped_rounds)
        self.start()

    def launch(self, payload: torch.Tensor) -> None:
        """Live, --overlap: start the round's payload exchange now; the round's steps go on while it is in
        flight, and the round's end exchanges the votes and waits for it (both in the round's quorum)."""
        wire = self.sync.wire(payload)
        with self.sync.stats.timed(wire.nbytes if self.seat.participants > 1 else 0):
            self.in_flight = (wire, payload, self.membership.launch(wire.summed, wire.gathered))
        self.sync.launched = True
        self.launches += 1

    def start(self) -> None:
        """Begin a segment of training: nothing pending, the pacing clock reset."""
        self.loss_sum = 0.0
        self.samples = 0
        self.compute_seconds = 0.0
        self.nonfinite_losses = 0
        self.steps = 0
        self.last_exchange = time.perf_counter()

    def add(self, local_loss: float, samples: int, compute_seconds: float) -> None:
        """Record one step of this rank; a non-finite loss counts as a vote that training diverged."""
        finite = math.isfinite(local_loss)
        self.loss_sum += local_loss if finite else 0.0
        self.samples += samples
        self.compute_seconds += compute_seconds
        self.nonfinite_losses += 0 if finite else 1
        self.steps += 1

    def due(self, in_sync: bool, last_of_epoch: bool) -> bool:
        return self.sync.exchanges_stats(self.steps, in_sync, last_of_epoch)

    def room(self) -> int:
        """The values this exchange adds after a payload (training/exchange's votes and per-rank figures)."""
        return len(SUMMED) + 3 * self.seat.participants

    def exchange(self, stop: bool, checkpoint_due: bool, time_up: bool, payload: torch.Tensor | None = None,
                 in_flight: Callable[[], None] | None = None) -> ExchangeResult | None:
        """All-reduce what is pending and this rank's votes (live: in the last room() values of the
        payload vector, float32, which holds their sums closely enough: they are reported, and votes are
        counts); pace the next exchange by rank 0's clock. None when the membership did not commit the
        round (redo it). `in_flight` runs while the all-reduce is under way (a debug fault's moment)."""
        world = self.seat.participants
        mine = {"loss_sum": self.loss_sum, "samples": self.samples, "stop_votes": float(stop),
                "diverged_votes": self.nonfinite_losses, "checkpoint_due": float(checkpoint_due),
                "time_up": float(time_up),
                "seconds_since_last": time.perf_counter() - self.last_exchange if self.seat.rank == 0 else 0.0}
        shared = torch.zeros(self.room(), dtype=torch.float64)
        shared[: len(SUMMED)] = torch.tensor([float(mine[name]) for name in SUMMED], dtype=torch.float64)
        per_rank = len(SUMMED)
        shared[per_rank + self.seat.rank] = self.compute_seconds
        shared[per_rank + world + self.seat.rank] = self.samples
        shared[per_rank + 2 * world + self.seat.rank] = self.membership.fingerprint
        steps = self.steps
        packed = shared
        if payload is not None:
            packed = payload
            packed[-len(shared):] = shared
        wire = self.sync.wire(packed) if payload is not None else Wire([packed])
        with self.sync.stats.timed(wire.nbytes if world > 1 else 0):
            reduced, gathered = self.membership.exchange(wire.summed, wire.gathered,
                                                         _both(in_flight, self.sync.work_while_exchanging),
                                                         wire.on_group)
        self.sync.unwire(wire, packed, gathered)
        launched, self.in_flight = self.in_flight, None
        if launched:  # the payload sent early (--overlap): its sum, once it has landed
            early_wire, early_payload, wait = launched
            with self.sync.stats.timed(0):
                landed, early_gathered = wait()
            self.sync.unwire(early_wire, early_payload, early_gathered)
            reduced = reduced and landed
        committed = self.membership.commit() and reduced
        self.start()  # a discarded round's losses and counts go with it: its steps are redone
        if not committed:
            return None
        if payload is not None:
            payload, shared = packed[: -len(shared)], packed[-len(shared):].double()
            if launched:
                payload = early_payload
        summed = dict(zip(SUMMED, shared[: len(SUMMED)].tolist()))
        result = ExchangeResult(**dict(summed, samples=int(summed["samples"])),
                                compute_seconds=shared[per_rank : per_rank + world].numpy(),
                                samples_by_rank=shared[per_rank + world : per_rank + 2 * world].numpy(),
                                fingerprints=shared[per_rank + 2 * world :].numpy(), steps=steps, payload=payload)
        self.sync.pace_stats(result.seconds_since_last / steps)
        return result


def _both(first: Callable[[], None] | None, then: Callable[[], None] | None) -> Callable[[], None] | None:
    """first(), then then(), skipping either where it is None."""
    if first is None or then is None:
        return first or then
    return lambda: (first(), then())
