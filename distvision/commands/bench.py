"""`distvision bench`: a suite of problems at several worker counts and sync modes; a results table."""

from __future__ import annotations

import argparse
from pathlib import Path

from distvision.bench.problems import list_problems
from distvision.bench.run import BenchConfig, format_row, run_bench
from distvision.errors import UserError
from distvision.scale.settings import parse_list, parse_syncs


def run(args: argparse.Namespace, argv: list[str]) -> None:
    """List the problems, or run the suite with the parsed settings and print its table."""
    if args.list:
        for problem in list_problems():
            print(f"{problem.name:<22} {problem.model:<12} {problem.description}")
        return
    if args.threads_per_worker < 1:
        raise UserError(f"--threads-per-worker must be at least 1 (got {args.threads_per_worker})")
    epochs_for = {}
    for item in args.epochs_for:
        name, _, epochs = item.partition("=")
        if not epochs.isdigit() or int(epochs) < 1:
            raise UserError(f"--epochs-for takes PROBLEM=EPOCHS with EPOCHS >= 1, e.g. cifar10-fastnet=1 (got {item!r})")
        epochs_for[name.strip()] = int(epochs)
    config = BenchConfig(
        problems=args.problems, epochs_for=epochs_for, workers=parse_list(args.workers, int, "--workers", 1),
        syncs=parse_syncs(args.sync, args.sync_every), sync_every=args.sync_every, max_epochs=args.max_epochs,
        threads_per_worker=args.threads_per_worker, cifar_data=args.cifar_data, precision=args.precision,
        seed=args.seed, out=args.out, cache_dir=args.cache_dir)
    rows = run_bench(config)
    print("\n".join(format_row(row) for row in rows))
    print(f"distvision bench: table in {Path(args.out) / 'bench.md'}")
