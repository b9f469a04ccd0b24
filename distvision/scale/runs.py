"""One `distvision train` run as a subprocess of the CLI, and what it measured.

`distvision scale` and `distvision bench` both time real runs exactly as a user starts them
(`python -m distvision train ...`, the local elastic launcher, real worker processes), so what
they report includes everything a user waits for: start-up, rendezvous, training, evaluation.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from distvision.config import TrainConfig
from distvision.errors import UserError
from distvision.fileio import write_json_atomic
from distvision.metrics import read_metrics
from distvision.parallel.child import (
    TrainingFailed,
    gpu_share,
    local_gpu_count,
    run_training,
    training_command,
)

RUN_TIMEOUT_SECONDS = 6 * 3600  # a run that takes longer than this is stuck, not slow


@dataclass
class TrainRun:
    """A finished run: the parent's wall clock, the run's summary.json and its epoch records."""

    run_dir: Path
    wall_seconds: float
    summary: dict
    epochs: list[dict]


def run_train(config: TrainConfig, run_dir: Path) -> TrainRun:
    """Run `distvision train` with these settings and --out run_dir to the end; reuse a run that already
    finished there.

    Callers set max_restarts=0: a restarted run's timings would mix two attempts.

    Reuse makes an interrupted grid resumable: rerunning the same command measures only what is missing.
    """
    run_dir = Path(run_dir)
    finished = load_run(run_dir)
    if finished:
        check_same_settings(finished, config)
        return finished
    if run_dir.exists():  # an unfinished attempt: its partial timings would mislead, start over
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    config = replace(config, out=str(run_dir))
    (run_dir.parent / f"{run_dir.name}.command").write_text(" ".join(training_command(config)) + "\n")
    started = time.perf_counter()
    try:
        # One run at a time; on a CUDA machine on GPUs 0.. (one per worker), the same for every run.
        gpus = gpu_share(0, local_gpu_count(), config.workers if isinstance(config.workers, int) else 1)
        run_training(config, run_dir.parent / f"{run_dir.name}.log", timeout=RUN_TIMEOUT_SECONDS, append_log=False,
                     gpus=gpus)
    except TrainingFailed as failure:
        raise UserError(f"training run {run_dir.name} failed (exit {failure.status}): "
                        f"{failure.last_line or '(no output)'}") from None
    wall = time.perf_counter() - started
    write_json_atomic(run_dir / "wall_seconds.json", {"wall_seconds": wall})
    return load_run(run_dir)


# The settings that make a run what it is; a finished run is reused only when they agree.
_IDENTITY = ("model", "workers", "epochs", "batch_size", "sync", "sync_every", "train_fraction",
             "threads_per_worker", "precision", "seed", "image_size")


def check_same_settings(run: TrainRun, wanted: TrainConfig | list[str]) -> None:
    """Refuse to reuse a finished run trained with other settings than `wanted` (a config, or train's flags)."""
    if not isinstance(wanted, TrainConfig):
        wanted = TrainConfig.from_argv(wanted)
    # The resolved values where the recipe supplied them; epochs as asked, not as stopped early.
    had = dict(run.summary["config"], workers=run.summary["world_size"], epochs=run.summary["recipe"]["epochs"],
               batch_size=run.summary["global_batch_size"])
    for name in _IDENTITY:
        value = getattr(wanted, name)
        if value in (None, "auto"):  # left to the recipe or to the run: anything goes
            continue
        if value != had.get(name):
            raise UserError(f"{run.run_dir} holds a finished run with {name}={had.get(name)!r}, not "
                            f"{value!r}: give another --out, or remove that folder")


def load_run(run_dir: Path) -> TrainRun | None:
    """A run finished earlier by run_train, or None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        wall = json.loads((run_dir / "wall_seconds.json").read_text())["wall_seconds"]
    except (OSError, ValueError, KeyError):
        return None
    return TrainRun(run_dir, wall, summary, read_metrics(run_dir))
