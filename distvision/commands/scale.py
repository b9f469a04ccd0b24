"""`distvision scale`: measure a grid of runs, fit a performance model, predict speedup."""

from __future__ import annotations

import argparse

from distvision.scale import run_scale
from distvision.scale.settings import ScaleConfig, parse_list, parse_syncs


def run(args: argparse.Namespace, argv: list[str]) -> None:
    """Run the grid with the parsed settings and print the headline."""
    config = ScaleConfig(
        data=args.data, model=args.model, out=args.out, workers=parse_list(args.workers, int, "--workers", 1),
        fractions=parse_list(args.fractions, float, "--fractions", 1e-6, 1.0),
        batch_sizes=parse_list(args.batch_sizes, int, "--batch-sizes", 1), syncs=parse_syncs(args.sync, args.sync_every),
        sync_every=args.sync_every, epochs=args.epochs, repeats=args.repeats,
        threads_per_worker=args.threads_per_worker,
        predict_workers=parse_list(args.predict_workers, int, "--predict-workers", 1), network=args.network,
        precision=args.precision, image_size=args.image_size, seed=args.seed, cache_dir=args.cache_dir)
    result = run_scale(config)
    fastest = result["recommendation"]["fastest"]
    print(f"distvision scale: model predicts every point within {result['max_relative_error']:.1%}; fastest on "
          f"{result['recommendation']['network']}: {fastest['workers']} worker(s), {fastest['sync']}, batch "
          f"{fastest['batch_size']} ({fastest['speedup']}x); report in {result['out']}/report.md")
