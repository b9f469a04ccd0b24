"""`distvision bench`: train every problem at every worker count and sync mode; a table of the results."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field, replace
from pathlib import Path

from distvision.bench.problems.registry import BenchSettings, Problem, resolve
from distvision.config import TrainConfig, split_sync
from distvision.errors import UserError
from distvision.fileio import write_json_atomic
from distvision.metrics import say
from distvision.scale.runs import run_train

COLUMNS = ("problem", "model", "sync", "workers", "test_accuracy", "epochs", "wall_seconds", "train_seconds",
           "speedup_wall", "speedup_train")


@dataclass
class BenchConfig:
    problems: str = "all"
    workers: list[int] = field(default_factory=lambda: [1, 2])
    syncs: list[str] = field(default_factory=lambda: ["allreduce", "local-sgd"])
    sync_every: str = "8"
    max_epochs: int | None = None  # caps every problem's own budget
    epochs_for: dict[str, int] = field(default_factory=dict)  # per problem: replaces its budget
    threads_per_worker: int = 1
    cifar_data: str | None = None
    precision: str = "fp32"
    seed: int = 0
    out: str = "runs/bench"
    cache_dir: str | None = None


def run_bench(config: BenchConfig) -> list[dict]:
    """Run the suite; write bench.csv, bench.md and bench.json into config.out; return the table rows."""
    from distvision.data.prepare import default_cache_dir

    problems = resolve(config.problems)
    unknown = set(config.epochs_for) - {p.name for p in problems}
    if unknown:
        raise UserError(f"--epochs-for names {', '.join(sorted(unknown))}, not among the problems run")
    if 1 not in config.workers:
        raise UserError("--workers must include 1: speedups are measured against one worker")
    if config.max_epochs is not None and config.max_epochs < 1:
        raise UserError(f"--max-epochs must be at least 1 (got {config.max_epochs})")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = BenchSettings(Path(config.cache_dir) if config.cache_dir else default_cache_dir(), config.cifar_data)
    rows = []
    for problem in problems:
        rows += _bench_problem(problem, config, settings, out)
        write_tables(out, rows, config)  # after every problem: a long suite shows results early
    return rows


def _bench_problem(problem: Problem, config: BenchConfig, settings: BenchSettings, out: Path) -> list[dict]:
    data = problem.data(settings)
    epochs = min(config.epochs_for.get(problem.name, problem.epochs), config.max_epochs or problem.epochs)
    # The problem's own flags over its model and budget; the bench's settings over those.
    base = TrainConfig.from_argv(list(problem.train_args), TrainConfig(data=None, model=problem.model, epochs=epochs))
    base = replace(base, threads_per_worker=config.threads_per_worker, precision=config.precision, seed=config.seed,
                   sync_every=config.sync_every, max_restarts=0)  # no restarts: their timings would mix
    if data:
        base.data = data
    if config.cache_dir:
        base.cache_dir = config.cache_dir
    folder = out / "runs" / problem.name.replace(":", "-").replace("/", "-")
    rows, alone = [], None
    # One worker trains the same whatever the sync mode (nothing to synchronise): run it once.
    for sync in config.syncs:
        for workers in sorted(config.workers):
            if workers == 1 and alone is not None:
                continue
            # alone, nothing is sent: no codes, fragments or overlap
            run = run_train(replace(base, workers=workers, **split_sync(sync, alone=workers == 1)),
                            folder / ("w1" if workers == 1 else f"{sync}-w{workers}"))
            row = {"problem": problem.name, "model": problem.model, "sync": "-" if workers == 1 else sync,
                   "workers": workers, "test_accuracy": round(run.summary["test_accuracy"], 4),
                   "epochs": run.summary["epochs"], "wall_seconds": round(run.wall_seconds, 1),
                   "train_seconds": round(run.summary["train_seconds"], 1)}
            if workers == 1:
                alone = row
            row["speedup_wall"] = round(alone["wall_seconds"] / row["wall_seconds"], 2)
            row["speedup_train"] = round(alone["train_seconds"] / max(row["train_seconds"], 1e-9), 2)
            say(f"distvision bench: {format_row(row)}")
            rows.append(row)
    return rows


def format_row(row: dict) -> str:
    return (f"{row['problem']:<20} {row['sync']:<10} {row['workers']:>2} workers  acc {row['test_accuracy']:.4f}  "
            f"{row['epochs']:>3} epochs  {row['wall_seconds']:>7.1f} s wall  {row['train_seconds']:>7.1f} s train  "
            f"speedup {row['speedup_wall']:.2f}x wall, {row['speedup_train']:.2f}x train")


def write_tables(out: Path, rows: list[dict], config: BenchConfig) -> None:
    with open(out / "bench.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [("| problem | model | sync | workers | test accuracy | epochs | wall s | train s | speedup (wall) "
             "| speedup (train) |"), "|---|---|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    write_json_atomic(out / "bench.json", {"rows": rows, "threads_per_worker": config.threads_per_worker,
                                           "max_epochs": config.max_epochs, "epochs_for": config.epochs_for,
                                           "sync_every": config.sync_every})
