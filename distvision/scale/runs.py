"""One `distvision train` run as a subprocess of the CLI, and what it measured.

`distvision scale` and `distvision bench` both time real runs exactly as a user starts them
(`python -m distvision train ...`, the local elastic launcher, real worker processes), so what
they report includes everything a user waits for: start-up, rendezvous, training, evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from distvision.errors import UserError
from distvision.fileio import write_json_atomic
from distvision.metrics import read_metrics
from distvision.parallel.launch import FOLLOW_PARENT_VARIABLE

RUN_TIMEOUT_SECONDS = 6 * 3600  # a run that takes longer than this is stuck, not slow


@dataclass
class TrainRun:
    """A finished run: the parent's wall clock, the run's summary.json and its epoch records."""

    run_dir: Path
    wall_seconds: float
    summary: dict
    epochs: list[dict]


def run_train(train_args: list[str], run_dir: Path) -> TrainRun:
    """Run `distvision train <train_args> --out run_dir` to the end; reuse a run that already finished there.

    Callers pass --max-restarts 0: a restarted run's timings would mix two attempts.

    Reuse makes an interrupted grid resumable: rerunning the same command measures only what is missing.
    """
    run_dir = Path(run_dir)
    finished = load_run(run_dir)
    if finished:
        check_same_settings(finished, train_args)
        return finished
    if run_dir.exists():  # an unfinished attempt: its partial timings would mislead, start over
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "distvision", "train", *train_args, "--out", str(run_dir)]
    (run_dir.parent / f"{run_dir.name}.command").write_text(" ".join(command) + "\n")
    started = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        env = {**os.environ, FOLLOW_PARENT_VARIABLE: str(os.getpid())}  # stops if we die
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=RUN_TIMEOUT_SECONDS, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = (run_dir.parent / f"{run_dir.name}.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"training run {run_dir.name} failed (exit {done.returncode}): {tail[0]}")
    write_json_atomic(run_dir / "wall_seconds.json", {"wall_seconds": wall})
    return load_run(run_dir)


# The settings that make a run what it is; a finished run is reused only when they agree.
_IDENTITY = ("model", "workers", "epochs", "batch_size", "sync", "sync_every", "train_fraction",
             "threads_per_worker", "precision", "seed", "image_size")


def check_same_settings(run: TrainRun, train_args: list[str]) -> None:
    """Refuse to reuse a finished run trained with other settings than train_args ask for."""
    from distvision.cli import build_parser

    wanted = vars(build_parser().parse_args(["train", *train_args]))
    # The resolved values where the recipe supplied them; epochs as asked, not as stopped early.
    had = dict(run.summary["config"], workers=run.summary["world_size"], epochs=run.summary["recipe"]["epochs"],
               batch_size=run.summary["global_batch_size"])
    for name in _IDENTITY:
        if wanted.get(name) in (None, "auto"):  # left to the recipe or to the run: anything goes
            continue
        if wanted[name] != had.get(name):
            raise UserError(f"{run.run_dir} holds a finished run with {name}={had.get(name)!r}, not "
                            f"{wanted[name]!r}: give another --out, or remove that folder")


def load_run(run_dir: Path) -> TrainRun | None:
    """A run finished earlier by run_train, or None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        wall = json.loads((run_dir / "wall_seconds.json").read_text())["wall_seconds"]
    except (OSError, ValueError, KeyError):
        return None
    return TrainRun(run_dir, wall, summary, read_metrics(run_dir))
