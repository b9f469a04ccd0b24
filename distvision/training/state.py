"""Where a run is: a world-size-independent position plus the clocks and history that go with it.

Progress is (epoch, cursor), the cursor counting the samples of the epoch's permutation already
trained. Checkpoints carry it, so after a worker dies, a node joins or leaves, or the user stops and
resumes, the rest of the epoch is split over whoever is there now and every sample is still seen
exactly once per epoch.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields


@dataclass
class TrainState:
    world_size: int
    epoch: int = 0  # epochs finished
    cursor: int = 0  # samples of this epoch's permutation already trained
    step: int = 0  # optimizer steps, over all epochs
    train_seconds: float = 0.0  # training time (evaluation excluded), across resumes
    epoch_seconds: float = 0.0
    epoch_loss: float = 0.0  # summed over all workers' samples this epoch
    epoch_samples: int = 0
    log: list[dict] = field(default_factory=list)  # epoch records and restart/resume events
    _segment_started: float | None = field(default=None, repr=False, compare=False)

    def state_dict(self) -> dict:
        """The checkpointed fields (the clock of the running segment is not one of them)."""
        return {key: value for key, value in asdict(self).items() if not key.startswith("_")}

    @classmethod
    def from_state_dict(cls, saved: dict, world_size: int) -> TrainState:
        """The state a checkpoint recorded, now trained on by world_size workers."""
        names = [f.name for f in fields(cls) if not f.name.startswith("_")]
        return cls(**dict({name: saved[name] for name in names}, world_size=world_size))

    def load(self, saved: dict) -> None:
        """Take a peer's state in place (live healing): the loop's references to this state stay valid."""
        for name in self.state_dict():
            if name != "world_size":
                setattr(self, name, saved[name])

    # -- the training clock: segments of uninterrupted training, closed before evaluation or saving --
    def start_segment(self) -> None:
        self._segment_started = time.perf_counter()

    def close_segment(self) -> None:
        """Add the running segment's seconds to the run's and the epoch's training time."""
        if self._segment_started is not None:
            seconds = time.perf_counter() - self._segment_started
            self.train_seconds += seconds
            self.epoch_seconds += seconds
            self._segment_started = None

    def elapsed(self) -> float:
        """Training seconds so far, the running segment included."""
        running = time.perf_counter() - self._segment_started if self._segment_started is not None else 0.0
        return self.train_seconds + running

    # -- progress -----------------------------------------------------------------------------------------
    def advance(self, global_batch_size: int) -> None:
        """One optimizer step over a global batch of this many samples."""
        self.step += 1
        self.cursor += global_batch_size

    def add_loss(self, loss_sum: float, samples: int) -> None:
        self.epoch_loss += loss_sum
        self.epoch_samples += samples

    def finish_epoch(self, record: dict) -> None:
        """Log the epoch's record and move to the next epoch's start."""
        self.epoch += 1
        self.cursor, self.epoch_seconds, self.epoch_loss, self.epoch_samples = 0, 0.0, 0.0, 0
        self.log.append(record)

    def history(self) -> list[dict]:
        """The epoch records (events left out)."""
        return [record for record in self.log if "epoch" in record and "event" not in record]
