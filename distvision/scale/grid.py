"""Run the grid of `distvision scale`: real training runs, one per point and repeat, and what each measured."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from distvision.config import TrainConfig, split_sync
from distvision.scale.model import Point, syncs_in
from distvision.scale.runs import TrainRun, run_train
from distvision.scale.settings import ScaleConfig


@dataclass
class Measurement:
    """One run of one grid point, per epoch where it says so (averaged over the run's epochs)."""

    point: Point
    repeat: int
    wall_seconds: float  # the whole command, start-up and final evaluation included
    epoch_seconds: float  # training plus evaluation, per epoch: the model's T
    train_seconds: float  # training only, per epoch
    eval_seconds: float
    compute_seconds: float  # per worker (mean over workers), data loading excluded
    communication_seconds: float  # per worker: exchanging, and waiting for a slower peer
    data_seconds: float  # per worker: gathering and augmenting batches
    steps: int
    images_per_second: float
    bytes_exchanged: float  # per worker per epoch
    test_accuracy: float
    run_dir: str

    def row(self) -> dict:
        """A flat results.csv row."""
        p = self.point
        per_step = 1000 / max(self.steps, 1)
        return {
            "workers": p.workers, "samples": p.samples, "batch_size": p.batch_size, "sync": p.sync,
            "sync_every": p.sync_every if p.sync != "allreduce" else "", "repeat": self.repeat,
            "wall_seconds": round(self.wall_seconds, 3), "epoch_seconds": round(self.epoch_seconds, 3),
            "train_seconds": round(self.train_seconds, 3), "eval_seconds": round(self.eval_seconds, 3),
            "steps": self.steps, "step_ms": round(self.train_seconds * per_step, 2),
            "compute_ms_per_step": round(self.compute_seconds * per_step, 2),
            "communication_ms_per_step": round(self.communication_seconds * per_step, 2),
            "data_ms_per_step": round(self.data_seconds * per_step, 2),
            "eval_ms_per_step": round(self.eval_seconds * per_step, 2),
            "images_per_second": round(self.images_per_second, 1), "bytes_exchanged": int(self.bytes_exchanged),
            "payload_bytes_per_sync": int(p.payload_bytes), "test_accuracy": round(self.test_accuracy, 4),
            "run_dir": self.run_dir,
        }


def grid_points(config: ScaleConfig) -> list[tuple[str, int, int, float]]:
    """(sync, batch size, workers, fraction) in the order they run: small runs first, so a report comes early."""
    return sorted(product(config.syncs, config.batch_sizes, config.workers, config.fractions),
                  key=lambda p: (p[3], p[0], p[1], p[2]))


def point_name(sync: str, batch_size: int, workers: int, fraction: float, repeat: int) -> str:
    return f"{sync}-b{batch_size}-w{workers}-f{fraction:g}-r{repeat}"


def run_grid(config: ScaleConfig, out: Path, on_done=None) -> list[Measurement]:
    """Every point of the grid, `repeats` times; runs finished earlier in `out` are reused."""
    measurements = []
    for sync, batch_size, workers, fraction in grid_points(config):
        for repeat in range(config.repeats):
            run = run_train(point_config(config, sync, batch_size, workers, fraction),
                            out / "runs" / point_name(sync, batch_size, workers, fraction, repeat))
            measurements.append(measure(run, sync, config.sync_every, repeat))
            if on_done:
                on_done(measurements[-1])
    return measurements


def point_config(config: ScaleConfig, sync: str, batch_size: int, workers: int, fraction: float) -> TrainConfig:
    """The training settings of one grid point: no restarts, whose timings would mix two attempts."""
    point = TrainConfig(data=None, model=config.model, workers=workers, epochs=config.epochs, batch_size=batch_size,
                        **split_sync(sync, alone=workers == 1),  # alone, nothing is sent: no codes, fragments
                        sync_every=config.sync_every, train_fraction=fraction,
                        threads_per_worker=config.threads_per_worker, precision=config.precision, seed=config.seed,
                        image_size=config.image_size, max_restarts=0)  # recovery: auto, derived from the mode
    point = TrainConfig.from_argv(config.train_args, base=point)  # further flags, which win
    if config.data:
        point.data = config.data
    if config.cache_dir:
        point.cache_dir = config.cache_dir
    return point


def measure(run: TrainRun, sync: str, sync_every: str, repeat: int) -> Measurement:
    """What one finished run measured, per epoch and per worker (means)."""
    summary, epochs = run.summary, run.epochs
    workers = summary["world_size"]

    def per_worker(key: str) -> float:  # mean over workers and epochs
        return statistics.fmean(statistics.fmean(r[key]) for r in epochs)

    def per_epoch(key: str) -> float:
        return statistics.fmean(r[key] for r in epochs)

    steps = summary["stop_step"] // max(summary["epochs"], 1)
    syncs = syncs_in(steps, sync, sync_every)
    bytes_per_epoch = per_worker("bytes_exchanged")
    train_seconds, eval_seconds = per_epoch("epoch_seconds"), per_epoch("eval_seconds")
    data_seconds = per_worker("data_seconds")
    point = Point(workers, summary["train_count"], summary["global_batch_size"], sync, sync_every,
                  bytes_per_epoch / syncs if workers > 1 else 0.0, train_seconds + eval_seconds)
    return Measurement(
        point=point, repeat=repeat, wall_seconds=run.wall_seconds, epoch_seconds=train_seconds + eval_seconds,
        train_seconds=train_seconds, eval_seconds=eval_seconds,
        compute_seconds=per_worker("compute_seconds") - data_seconds,
        communication_seconds=per_worker("communication_seconds"), data_seconds=data_seconds, steps=steps,
        images_per_second=per_epoch("images_per_second"), bytes_exchanged=bytes_per_epoch,
        test_accuracy=summary["test_accuracy"], run_dir=str(run.run_dir),
    )


def median_points(measurements: list[Measurement]) -> list[Point]:
    """One Point per configuration: the median epoch time over its repeats."""
    groups: dict[tuple, list[Measurement]] = {}
    for m in measurements:
        p = m.point
        groups.setdefault((p.workers, p.samples, p.batch_size, p.sync, p.sync_every), []).append(m)
    points = []
    for group in groups.values():
        first = group[0].point
        points.append(Point(first.workers, first.samples, first.batch_size, first.sync, first.sync_every,
                            statistics.median(m.point.payload_bytes for m in group),
                            statistics.median(m.epoch_seconds for m in group)))
    return points
