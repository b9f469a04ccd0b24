"""distvision bench: the problem registry and generated problems (a real run: tests/e2e/test_bench.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distvision.bench.problems import get_problem, list_problems, resolve
from distvision.bench.problems.parity8 import parity_arrays
from distvision.bench.problems.registry import BenchSettings
from distvision.data.prepare import open_prepared
from distvision.errors import UserError


def test_registry_holds_the_suite_and_user_folders(tmp_path: Path):
    names = {p.name for p in list_problems()}
    assert {"parity8", "digits", "cifar10-caffe-quick", "cifar10-fastnet"} <= names
    assert [p.name for p in resolve("parity8, digits")] == ["parity8", "digits"]
    (tmp_path / "pets" / "cat").mkdir(parents=True)
    assert get_problem(f"folder:{tmp_path / 'pets'}").data(BenchSettings(tmp_path)) == str(tmp_path / "pets")
    with pytest.raises(UserError, match="no such folder"):
        get_problem(f"folder:{tmp_path / 'nowhere'}")
    with pytest.raises(UserError, match="--problems needs"):
        resolve(" , ")


def test_parity_patterns_are_all_256_with_their_parity():
    patterns = parity_arrays()
    bits = (patterns.images[:, :, 0, 0] > 0).astype(int)  # row i of the image is bit i
    assert len({tuple(row) for row in bits}) == 256
    assert np.array_equal(patterns.labels, bits.sum(axis=1) % 2)


def test_digits_become_a_prepared_folder(tmp_path: Path):
    pytest.importorskip("sklearn")
    prepared = open_prepared(Path(get_problem("digits").data(BenchSettings(tmp_path))))
    assert prepared.train_images.shape == (1438, 8, 8, 3) and prepared.test_images.shape == (359, 8, 8, 3)
    assert prepared.classes == [str(d) for d in range(10)]
    assert set(np.unique(prepared.test_labels)) == set(range(10))
