"""`distvision train-each`: one `distvision train` per data subset, several at once."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from distvision.config import TrainConfig, config_file_values, config_toml
from distvision.errors import UserError
from distvision.train_each import PoolSettings, train_each


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Train every subset; the exit status: 0 when all of them are trained."""
    for name in ("parallel", "workers_per_job"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    config = TrainConfig.from_namespace(args)
    replace(config, workers=args.workers_per_job, out=None).validate()  # EACH_DIR is no run folder
    if args.print_config:
        print(resolved_settings(args, config), end="")
        return 0
    if args.data is None or args.out is None:
        raise UserError("train-each needs --data ROOT (subset folders or a path,label,subset CSV) and --out EACH_DIR")
    settings = PoolSettings(args.parallel, args.workers_per_job, args.lease_seconds, config)
    return train_each(Path(args.data), Path(args.out), settings, args.image_size,
                      Path(args.cache_dir) if args.cache_dir else None, args.compare_global, args.only,
                      args.only_index)


def resolved_settings(args: argparse.Namespace, config: TrainConfig) -> str:
    """--print-config: every subset's train settings as a --config file, then the pool's, as comments."""
    each = replace(config, data=None, workers=args.workers_per_job)  # the data: each subset's own
    pool = ["", "train-each (comments: how the subsets are trained)",
            f"data: {args.data or '(not given: --data ROOT is required)'}",
            f"run folders: {f'{args.out}/<subset>' if args.out else '(not given: --out EACH_DIR is required)'}",
            f"subsets at once: {args.parallel}, {args.workers_per_job} worker(s) each",
            f"global model too: {'yes' if args.compare_global else 'no'}"]
    header = "distvision train-each: the train settings of every subset's run"
    return config_toml(config_file_values(each), header) + "".join(f"# {line}".rstrip() + "\n" for line in pool)
