"""`distvision classify`: predictions for a folder tree, a list of paths or a prepared folder."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from distvision.classify.routed import classify_routed, is_each_dir
from distvision.classify.settings import ClassifyConfig
from distvision.classify.worker import classify_command


def run(args: argparse.Namespace, argv: list[str]) -> None:
    """Classify with one checkpoint, or route each image to its subset's model of a train-each folder."""
    config = ClassifyConfig(**{f.name: getattr(args, f.name) for f in fields(ClassifyConfig)})
    if is_each_dir(Path(config.checkpoint)):  # train-each's models: each image to its subset's model
        classify_routed(config, argv, args.fallback)
        return
    classify_command(config, argv)
