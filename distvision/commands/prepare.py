"""`distvision prepare`: decode a data source once into the memory-mapped cache."""

from __future__ import annotations

import argparse
from pathlib import Path

from distvision.data.prepare import prepare


def run(args: argparse.Namespace, argv: list[str]) -> None:
    """Prepare args.path into args.out and say what was kept and skipped."""
    out = Path(args.out)
    manifest = prepare(Path(args.path), out, args.image_size, args.processes)
    print(f"prepared {manifest['train_count']} training and {manifest['test_count']} test images "
          f"({len(manifest['classes'])} classes) into {out} in {manifest['prepare_seconds']}s; "
          f"skipped {len(manifest['skipped_files'])} unreadable file(s)")
