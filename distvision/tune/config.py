"""Settings of `distvision tune`: the single source of the defaults its command line shows."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from distvision.errors import UserError

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("asha", "hyperband", "none")


@dataclass
class TuneConfig:
    data: str | None = None
    model: str = "caffe-quick"
    recipe: str = "default"  # the recipe the search varies (its other settings stay fixed)
    space: str | None = None  # TOML search space; None: a default around the model's recipe
    trials: int = 20  # finished trials wanted in the study, over every process working on it
    parallel: int = 1  # trial workers on this machine
    workers_per_trial: int = 1  # data-parallel workers inside each trial
    # How a trial's workers stay in step (as train's flags; every trial the same): the search's fixed
    # settings, for a search of what trains well under the synchronisation the cluster can afford.
    sync: str = "allreduce"
    sync_every: str | None = None
    quantize: str = "none"
    fragments: int = 1
    overlap: int = 0
    epochs: int | None = None  # the most a trial trains (pruners stop bad ones earlier); None: the recipe's
    sampler: str = "tpe"
    pruner: str = "asha"
    storage: str | None = None  # SQLAlchemy URL; None: a journal file in the output folder
    # Database storage: a live trial worker marks its trial every heartbeat_seconds; a trial without a
    # mark for heartbeat_grace seconds belongs to a dead worker (any machine) and is run again.
    heartbeat_seconds: float = 10.0
    heartbeat_grace: float = 60.0
    study: str = "distvision"
    out: str = "runs/tune"
    seed: int = 0  # the training seed of every trial (the sampler is not seeded: parallel workers differ)
    val_fraction: float = 0.1  # trials are scored on this held-out share of the training set
    precision: str = "auto"
    image_size: int = 32
    cache_dir: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Reject settings that cannot work, with a message that says what to change."""
        for name in ("trials", "parallel", "workers_per_trial"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.epochs is not None and self.epochs < 1:
            raise UserError(f"--epochs must be at least 1 (got {self.epochs})")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in (0, 1): trials are scored on it (got {self.val_fraction})")
        if not 0 < self.heartbeat_seconds < self.heartbeat_grace:
            raise UserError(f"--heartbeat-grace ({self.heartbeat_grace}) must be longer than --heartbeat-seconds "
                            f"({self.heartbeat_seconds}), and both positive")
        if self.sampler not in SAMPLERS:
            raise UserError(f"--sampler must be one of {', '.join(SAMPLERS)} (got {self.sampler})")
        if self.pruner not in PRUNERS:
            raise UserError(f"--pruner must be one of {', '.join(PRUNERS)} (got {self.pruner})")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise UserError(f"--out {self.out} is a file; give a folder for the search's outputs")
