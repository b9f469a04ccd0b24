"""Faults on purpose and stops on request: every --debug-* behaviour, the sample audit, and SIGTERM.

The loop calls the FaultInjector at fixed points of each step; with no debug flag set every call
returns at once, so the normal path pays nothing for them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from distvision.config import TrainConfig
from distvision.metrics import say
from distvision.parallel.launch import note_stop_signal
from distvision.parallel.membership import Seat

STOP_GRACE_SECONDS = 20.0  # after SIGTERM: time to finish the step and checkpoint before a hard exit


def parse_rank_setting(setting: str | None, off: float) -> tuple[int, float]:
    """A debug setting RANK:NUMBER as (rank, number); (-1, off) when not given."""
    if not setting:
        return -1, off
    rank, number = setting.split(":")
    return int(rank), float(number)


class StopSignal:
    """Remembers SIGTERM/SIGINT so the loop can stop at a step boundary with a checkpoint.

    Installed only around the training loop: anywhere else a signal ends the process at once. A
    worker that cannot reach a step boundary (stuck in a collective with a dead peer) still exits
    after STOP_GRACE_SECONDS, so the agent's restart never waits on it.
    """

    def __init__(self):
        self.requested = False
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._handle)

    def _handle(self, number, frame):
        note_stop_signal(number)  # a process-wide fact, as the signal is: how the process ends
        if not self.requested:
            watchdog = threading.Timer(STOP_GRACE_SECONDS, os._exit, args=(128 + number,))
            watchdog.daemon = True
            watchdog.start()
        self.requested = True


@dataclass
class OneShot:
    """A debug fault at RANK:STEP that fires once per run folder (a marker file there), so that the
    worker respawned into the job, which may redo that step, does not fault again."""

    rank: int
    step: int
    marker: Path

    @classmethod
    def parse(cls, setting: str | None, marker: Path) -> OneShot:
        rank, step = parse_rank_setting(setting, -1)
        return cls(rank, int(step), marker)

    def fires(self, rank: int, step: int) -> bool:
        if rank != self.rank or step < self.step or self.marker.exists():
            return False
        self.marker.touch()
        return True


STOP_SECONDS = 3.0  # a "stop" fault freezes the worker (SIGSTOP) this long


@dataclass
class PhaseFault:
    """--debug-fault KIND:RANK:STEP[:PHASE]: whoever holds RANK does KIND at the first PHASE at or after
    global step STEP, once per run folder. Phases: after a step (step), while the round's all-reduce
    is in flight (exchange), in the epoch's evaluation after its own part (eval), while serving its
    state to a healing peer (heal). Kinds: SIGKILL itself (kill), SIGTERM itself, so that it leaves
    alone (term), freeze for STOP_SECONDS (stop), hang in Python with its heartbeat alive (hang)."""

    kind: str
    phase: str
    when: OneShot

    @classmethod
    def parse(cls, setting: str, marker: Path) -> PhaseFault:
        kind, rank, step, *phase = setting.split(":")
        return cls(kind, phase[0] if phase else "step", OneShot(int(rank), int(step), marker))

    def strike(self, step: int) -> None:
        say(f"distvision: debug fault: {self.kind} in the {self.phase} phase at step {step} (rank {self.when.rank})")
        sys.stdout.flush()
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.kind == "stop":  # a process cannot wake itself: a child sends the SIGCONT
            subprocess.Popen(["sh", "-c", f"sleep {STOP_SECONDS}; kill -CONT {os.getpid()}"],
                             start_new_session=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            while True:  # stuck in Python; torchft's heartbeat thread beats on
                time.sleep(3600)


class FaultInjector:
    """--debug-slowdown, --debug-nan-at, --debug-corrupt-at, --debug-fault, --debug-step-delay and
    --debug-stop-at-step."""

    def __init__(self, config: TrainConfig, seat: Seat, model: nn.Module | None = None):
        self.seat = seat  # a rank setting names whoever holds that rank in the round
        self.model = model
        run_dir = Path(config.out or ".")
        self.corrupt = OneShot.parse(config.debug_corrupt_at, run_dir / "debug-corrupted")
        self.phase_faults = [PhaseFault.parse(setting, run_dir / f"debug-fault-{number}")
                             for number, setting in enumerate(config.debug_faults)
                             if not setting.startswith("lighthouse:")]  # the launcher's (lighthouse_restarts)
        self.slow_rank, self.slow_factor = parse_rank_setting(config.debug_slowdown, 1.0)
        self.nan_rank, nan_step = parse_rank_setting(config.debug_nan_at, -1)
        self.nan_step = int(nan_step)
        self.step_delay = config.debug_step_delay
        self.stop_at_step = config.debug_stop_at_step
        self.slowdown_seconds = 0.0  # the extra compute time the next step simulates

    def before_exchange_of_gradients(self) -> None:
        """--debug-slowdown: a slower machine's extra time falls before the gradient exchange, while the
        other workers compute; after the step's exchange it would only make them wait in turn."""
        if self.seat.rank == self.slow_rank:
            time.sleep(self.slowdown_seconds)

    def corrupt_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """--debug-nan-at: this rank's loss turns NaN at that global step."""
        if self.seat.rank == self.nan_rank and step == self.nan_step:
            return loss * float("nan")
        return loss

    def after_step(self, step: int, compute_seconds: float) -> None:
        if self.model is not None and self.corrupt.fires(self.seat.rank, step):
            with torch.no_grad():
                next(self.model.parameters()).add_(1.0)  # as a bit flip or a bad update would, silently
        self.strike("step", step)
        if self.seat.rank == self.slow_rank:  # the next step sleeps (factor - 1) x this step's own compute time
            self.slowdown_seconds = (self.slow_factor - 1) * (compute_seconds - self.slowdown_seconds)
        if self.step_delay:
            time.sleep(self.step_delay)

    def strike(self, phase: str, step: int) -> None:
        """--debug-fault: the faults due in this phase at this step (the loop and the membership call it
        at each phase)."""
        for fault in self.phase_faults:
            if fault.phase == phase and fault.when.fires(self.seat.rank, step):
                fault.strike(step)

    def wants_stop(self, step: int) -> bool:
        """--debug-stop-at-step: rank 0 asks for a resumable stop, as SIGTERM would."""
        return self.seat.rank == 0 and self.stop_at_step is not None and step >= self.stop_at_step


class SampleAudit:
    """--audit-samples: per-rank log of the sample indices trained at each step (for coverage checks).

    Each attempt (start, restart, resume) gets rank 0's clock as its id, shared by all ranks, so a
    reader can tell a step redone after a restart from the attempt that was lost.
    """

    def __init__(self, run_dir: Path, writer: int, seat: Seat):
        attempt = [time.time_ns()]
        if dist.is_initialized():
            dist.broadcast_object_list(attempt, src=0)
        folder = run_dir / "audit"
        folder.mkdir(parents=True, exist_ok=True)
        self.attempt, self.seat = attempt[0], seat
        self.file = open(folder / f"attempt{self.attempt}-rank{writer}.jsonl", "a", buffering=1)  # noqa: SIM115

    def record(self, epoch: int, step: int, indices: np.ndarray, attempt: int | None = None,
               batch: np.ndarray | None = None) -> None:
        """`attempt`: live membership gives the quorum's id (shared by the step's participants). `batch`:
        live, the whole global batch of a committed step. A round can commit on one replica and fail on
        another (a peer died as the all-reduce ended): the committed sum holds every participant's share,
        and only the committers write."""
        record = {"attempt": self.attempt if attempt is None else attempt, "epoch": epoch, "step": step,
                  "world_size": self.seat.participants, "indices": indices.tolist()}
        if batch is not None:
            record["batch"] = batch.tolist()
        self.file.write(json.dumps(record) + "\n")


def lighthouse_restarts(config: TrainConfig) -> list[int]:
    """--debug-fault lighthouse:0:STEP: the steps at which the live launcher restarts its Lighthouse."""
    return sorted(int(setting.split(":")[2]) for setting in config.debug_faults if setting.startswith("lighthouse:"))
