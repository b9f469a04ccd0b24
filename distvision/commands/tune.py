"""`distvision tune`: a hyperparameter search with Optuna."""

from __future__ import annotations

import argparse
from dataclasses import fields

from distvision.tune.config import TuneConfig
from distvision.tune.run import run_tune


def run(args: argparse.Namespace, argv: list[str]) -> None:
    """Run the search with the parsed settings."""
    run_tune(TuneConfig(**{f.name: getattr(args, f.name) for f in fields(TuneConfig)}))
