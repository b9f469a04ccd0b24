"""8-bit parity, the problem Dahl, McAvinney and Newhall (2008) trained pattern-parallel.

The 256 patterns become 8x8 images, row i white where bit i is set; the label is the parity. As
in the paper the network learns all 256 patterns (the test set is those patterns); one "epoch"
here is 32 passes over them, so that a step has more than a handful of samples to split.
"""

from __future__ import annotations

import numpy as np

from distvision.bench.problems.registry import BenchSettings, Problem, generated_data, register_problem
from distvision.data.sources import ArraySplit, Source

BITS = 8
PASSES_PER_EPOCH = 32
IMAGE_SIZE = 8  # the smallest image train accepts: one row per bit


def parity_arrays() -> ArraySplit:
    """All 2^8 patterns as (256, 8, 8, 3) uint8 images and their parity labels."""
    patterns = np.arange(2**BITS)
    bits = (patterns[:, None] >> np.arange(BITS)[None, :]) & 1
    images = np.repeat(np.repeat(bits[:, :, None, None] * 255, IMAGE_SIZE, axis=2), 3, axis=3)
    return ArraySplit(images.astype(np.uint8), (bits.sum(axis=1) % 2).astype(np.int64))


def parity_source() -> Source:
    patterns = parity_arrays()
    train = ArraySplit(np.tile(patterns.images, (PASSES_PER_EPOCH, 1, 1, 1)),
                       np.tile(patterns.labels, PASSES_PER_EPOCH))
    return Source("generated", ["even", "odd"], train, patterns)


def parity_data(settings: BenchSettings) -> str:
    return generated_data(settings, "parity8-v1", parity_source, IMAGE_SIZE)


register_problem(Problem(
    name="parity8",
    description="Dahl et al.'s 8-bit parity (256 patterns, generated), MLP, until 100% or 30 epochs",
    model="mlp",
    epochs=30,
    data=parity_data,
    train_args=("--image-size", str(IMAGE_SIZE), "--batch-size", "64", "--lr", "0.05",
                "--target-accuracy", "1.0"),
))
