"""distvision bench: a real run of the suite (the registry and generated problems: tests/unit/test_bench.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.helpers import run_cli


def test_bench_runs_parity_end_to_end(tmp_path: Path):
    out = tmp_path / "bench"
    result = run_cli(["bench", "--problems", "parity8", "--workers", "1,2", "--sync", "allreduce",
                      "--out", str(out)], tmp_path / "cache", timeout=280)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = list(csv.DictReader((out / "bench.csv").read_text().splitlines()))
    assert [(r["workers"], r["sync"]) for r in rows] == [("1", "-"), ("2", "allreduce")]
    for row in rows:
        assert float(row["test_accuracy"]) >= 0.95  # parity is learnt, with one worker and with two
        assert 1 <= int(row["epochs"]) < 30  # --target-accuracy 1.0 ended it before the budget
    # each speedup is one worker's time over this row's, of the same measured runs
    for key in ("wall", "train"):
        alone = float(rows[0][f"{key}_seconds"])
        assert float(rows[0][f"speedup_{key}"]) == 1.0
        assert float(rows[1][f"speedup_{key}"]) == pytest.approx(alone / float(rows[1][f"{key}_seconds"]), abs=0.01)
    assert "| parity8 | mlp | allreduce | 2 |" in (out / "bench.md").read_text()
    assert "parity8" in result.stdout and "speedup" in result.stdout
