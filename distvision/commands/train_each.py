"""`distvision train-each`: one `distvision train` per data subset, several at once."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from distvision.config import TrainConfig
from distvision.errors import UserError
from distvision.train_each import PoolSettings, train_each


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Train every subset; the exit status: 0 when all of them are trained."""
    if args.data is None or args.out is None:
        raise UserError("train-each needs --data ROOT (subset folders or a path,label,subset CSV) and --out EACH_DIR")
    for name in ("parallel", "workers_per_job"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    config = TrainConfig.from_namespace(args)
    replace(config, workers=args.workers_per_job, out=None).validate()  # EACH_DIR is no run folder
    settings = PoolSettings(args.parallel, args.workers_per_job, args.lease_seconds, config)
    return train_each(Path(args.data), Path(args.out), settings, args.image_size,
                      Path(args.cache_dir) if args.cache_dir else None, args.compare_global, args.only,
                      args.only_index)
