"""One trial: an ordinary `distvision train` run in a subprocess, followed epoch by epoch.

The trial's run folder (TUNE_DIR/trials/<number>/) is a normal run folder: config.toml (the
settings, loadable by `distvision train --config`), train.log, metrics.jsonl, summary.json and the
checkpoint. After every epoch the child's validation accuracy goes to the pruner; a pruned trial's
child is stopped at once with SIGTERM (train stops cleanly at the next step).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from distvision.extras import require_extra

with require_extra("tune", "distvision tune"):
    import optuna
    from optuna.trial import TrialState

from distvision.config import TrainConfig, write_config_file
from distvision.parallel.child import TrainingChild, TrainingFailed, start_training
from distvision.tune.config import TuneConfig
from distvision.tune.space import Dimension, train_settings

POLL_SECONDS = 0.5  # how often the parent looks for a new epoch line


class TrialFailed(Exception):
    """The trial's training run failed; the trial is recorded as FAIL and the search goes on."""


class StudyFull(TrialFailed):
    """Another machine started the study's last trial at the same moment: this one is not run."""


def process_identity(pid: int) -> str:
    """host:pid:start-time, which tells a live process from a later one that reuses its pid."""
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{socket.gethostname()}:{pid}:{start}"


def trial_config(config: TuneConfig, epochs: int, params: dict) -> dict:
    """The TrainConfig values of one trial: the search's fixed settings plus the trial's parameters."""
    values = {"model": config.model, "recipe": config.recipe, "data": config.data, "epochs": epochs,
              "seed": config.seed, "val_fraction": config.val_fraction, "precision": config.precision,
              "image_size": config.image_size, "workers": config.workers_per_trial,
              "sync": config.sync, "sync_every": config.sync_every, "quantize": config.quantize,
              "fragments": config.fragments, "overlap": config.overlap,
              # a failed trial is tune's to retry (study.py); and a single worker with no restarts to
              # give trains in the trial's own process, a Python and torch start-up fewer
              "max_restarts": 0}
    if config.cache_dir:
        values["cache_dir"] = config.cache_dir
    return values | train_settings(params)


def make_objective(config: TuneConfig, space: list[Dimension], epochs: int, cores: list[int], on_start=None,
                   gpus: Sequence[int] = ()):
    """The Optuna objective: suggest a configuration, train it (on `cores`, and `gpus` on a CUDA machine),
    report validation accuracy per epoch."""

    def objective(trial: optuna.Trial) -> float:
        if on_start:
            on_start()
        trial.set_user_attr("worker", process_identity(os.getpid()))
        if trials_before(trial.study, trial.number) >= config.trials:
            trial.set_user_attr("error", f"surplus: the study already had {config.trials} trials when it started")
            raise StudyFull(f"trial {trial.number} not run: the study already has {config.trials} trials")
        params = {dimension.name: dimension.suggest(trial) for dimension in space}
        run_dir = Path(config.out) / "trials" / str(trial.number)
        run_dir.mkdir(parents=True, exist_ok=True)
        values = trial_config(config, epochs, params)
        write_config_file(run_dir / "config.toml", values, f"trial {trial.number}")
        trial.set_user_attr("run_dir", str(run_dir))
        # On this worker's share of the cores (train gives its workers cores/workers threads each) and
        # GPUs; SIGTERM, a clean stop, if this worker dies, so no training outlives its trial.
        child = start_training(TrainConfig(**values, out=str(run_dir)), run_dir / "train.log", cores,
                               gpus=gpus)
        try:
            return _follow(trial, child, run_dir, epochs)
        finally:
            child.stop()

    return objective


def trials_before(study: optuna.Study, number: int) -> int:
    """Trials numbered below this one that count toward --trials (finished or running).

    Trial numbers are handed out by the storage, so this is exact even when workers on several
    machines claim the study's last trial at once: the later number is the surplus one.
    """
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=counted) if t.number < number)


def _follow(trial: optuna.Trial, child: TrainingChild, run_dir: Path, epochs: int) -> float:
    """Report each new epoch's validation accuracy; prune, or return the final one.

    The last epoch is reported but never pruned: the training is done, and a pruned trial could
    not be the best one.
    """
    metrics_path, seen = run_dir / "metrics.jsonl", 0
    while True:
        finished = child.poll() is not None  # read the log after this, so no last line is missed
        records = _epoch_records(metrics_path)
        for record in records[seen:]:
            trial.report(record["val_accuracy"], record["epoch"])
            if record["epoch"] < epochs and trial.should_prune():
                child.stop()
                raise optuna.TrialPruned(f"pruned after epoch {record['epoch']}")
        seen = len(records)
        if finished:
            break
        time.sleep(POLL_SECONDS)
    try:
        child.check()
    except TrainingFailed as failure:
        trial.set_user_attr("error", f"exit {failure.status}: {failure.last_line[:300]}")
        raise TrialFailed(f"trial {trial.number}: {failure}") from None
    summary = json.loads((run_dir / "summary.json").read_text())
    trial.set_user_attr("precision", summary["precision"])
    trial.set_user_attr("stop_reason", summary["stop_reason"])
    # A diverged run ends early and may have no epoch at all: it scores what it last reached, or 0.
    return records[-1]["val_accuracy"] if records else 0.0


def _epoch_records(metrics_path: Path) -> list[dict]:
    try:
        lines = metrics_path.read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            break  # a line still being written
        if "event" not in record and "val_accuracy" in record:
            records.append(record)
    return records
