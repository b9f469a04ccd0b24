"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), MLP."""

from __future__ import annotations

import numpy as np

from distvision.bench.problems.registry import BenchSettings, Problem, generated_data, register_problem
from distvision.data.sources import ArraySplit, Source
from distvision.extras import require_extra

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def digits_source() -> Source:
    """The digits as 8x8 grey images scaled 0-16 -> 0-255, a seeded 20% held out for testing."""
    with require_extra("bench", "distvision bench's digits problem"):
        from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.repeat((digits.images * (255 / 16)).round().astype(np.uint8)[..., None], 3, axis=3)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    test_count = round(len(labels) * TEST_FRACTION)
    test, train = order[:test_count], order[test_count:]
    return Source("generated", [str(d) for d in range(10)], ArraySplit(images[train], labels[train]),
                  ArraySplit(images[test], labels[test]))


def digits_data(settings: BenchSettings) -> str:
    return generated_data(settings, "digits-v1", digits_source, 8)


register_problem(Problem(
    name="digits",
    description="scikit-learn's 8x8 digits (1,438 train / 359 test), MLP, 20 epochs",
    model="mlp",
    epochs=20,
    data=digits_data,
    train_args=("--image-size", "8", "--batch-size", "64", "--lr", "0.05"),
))
