"""`distvision evaluate`: a checkpoint's accuracy on a data set's test split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distvision.evaluate import evaluate_checkpoint


def run(args: argparse.Namespace, argv: list[str]) -> None:
    """Evaluate and print the result as JSON."""
    result = evaluate_checkpoint(Path(args.checkpoint), Path(args.data),
                                 Path(args.cache_dir) if args.cache_dir else None)
    print(json.dumps(result))
