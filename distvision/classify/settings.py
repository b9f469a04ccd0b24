"""Settings of `distvision classify` (the single source of their defaults) and where its outputs go."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from distvision.errors import UserError


@dataclass
class ClassifyConfig:
    checkpoint: str
    input: str
    out: str = "runs/classify/predictions.csv"  # the CSV; the other outputs and parts/ go into the same folder
    workers: int = 2  # local worker processes when not started by torchrun
    top_k: int = 5
    # Images per forward pass: 128 ran ~15% faster than 500 for fastnet on one thread here (its
    # activations stay small enough for the allocator to reuse instead of mapping fresh pages).
    batch_size: int = 128
    chunk_size: int = 1000  # files per unit of work: one claim, one part file
    decode_threads: int | None = None  # per worker; None: the worker's share of the cores
    resume: bool | None = None  # None: continue when parts exist
    device: str = "auto"
    max_restarts: int = 3  # local worker-group restarts after a worker dies
    join_timeout: float = 600.0  # seconds to wait for the workers at rendezvous
    debug_chunk_delay: float = 0.0  # sleep after every chunk, to make a run slow (tests)
    debug_slow_rank: int | None = None  # only this rank sleeps: one slow worker among fast ones
    # Set by the local launcher for its workers.
    launched_at: float | None = None  # when the user's command started (start-up time is measured from it)
    planned: bool = False  # the launcher wrote parts/plan.json just now: use it without scanning again

    def validate(self) -> None:
        """Reject settings that cannot work, with a message that says what to change."""
        for name in ("workers", "top_k", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.decode_threads is not None and self.decode_threads < 0:
            raise UserError(f"--decode-threads must be 0 or more (got {self.decode_threads})")
        if self.max_restarts < 0:
            raise UserError(f"--max-restarts must be 0 or more (got {self.max_restarts})")
        if Path(self.out).is_dir():
            raise UserError(f"--out {self.out} is a folder: give the path of the predictions CSV to write")

    def outputs(self) -> Outputs:
        return Outputs(Path(self.out))


@dataclass
class Outputs:
    """Every file the command writes: the predictions CSV and, beside it, the rest."""

    predictions: Path

    @property
    def folder(self) -> Path:
        return self.predictions.parent

    @property
    def parts(self) -> Path:
        return self.folder / "parts"

    @property
    def errors(self) -> Path:
        return self.folder / "errors.csv"

    @property
    def summary(self) -> Path:
        return self.folder / "summary.json"

    @property
    def per_class(self) -> Path:
        return self.folder / "per_class.csv"

    @property
    def confusion_csv(self) -> Path:
        return self.folder / "confusion_matrix.csv"

    @property
    def confusion_png(self) -> Path:
        return self.folder / "confusion_matrix.png"

    def own_files(self) -> tuple[str, ...]:
        """Real paths of everything this command writes, so an input folder that holds them skips them."""
        files = (self.predictions, self.errors, self.summary, self.per_class, self.confusion_csv, self.confusion_png)
        return tuple(os.path.realpath(path) for path in (self.parts, *files))
