"""distvision scale: a tiny real sweep and its report (the performance model's fit and predictions, and bad
input: tests/unit/test_scale.py)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from distvision.bench.problems import get_problem
from distvision.bench.problems.registry import BenchSettings
from distvision.errors import UserError
from distvision.scale.runs import check_same_settings, load_run
from tests.helpers import run_cli


def test_tiny_real_sweep_writes_the_report(tmp_path: Path):
    cache = tmp_path / "cache"
    digits = get_problem("digits").data(BenchSettings(cache / "distvision"))
    out = tmp_path / "report"
    result = run_cli(["scale", "--data", digits, "--model", "mlp", "--image-size", "8", "--workers", "1,2",
                      "--fractions", "0.5,1", "--batch-sizes", "64", "--epochs", "1",
                      "--predict-workers", "4,16", "--network", "1gbit,100us", "--out", str(out)], cache, timeout=280)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert sorted((int(r["workers"]), int(r["samples"])) for r in rows) == [(1, 719), (1, 1438), (2, 719), (2, 1438)]
    for row in rows:
        assert float(row["epoch_seconds"]) > 0 and float(row["images_per_second"]) > 0
        parts = [float(row[f"{name}_ms_per_step"]) for name in ("compute", "communication", "data", "eval")]
        assert all(part >= 0 for part in parts) and float(row["compute_ms_per_step"]) > 0
        assert float(row["data_ms_per_step"]) > 0  # train's records carry data_seconds
        # Every worker got --threads-per-worker 1, even a lone one on a machine with more cores.
        assert json.loads((Path(row["run_dir"]) / "summary.json").read_text())["threads_per_worker"] == 1
    # Two workers exchange gradients every step; one worker only its few bytes of loss bookkeeping.
    sent = {(r["workers"], r["samples"]): int(r["bytes_exchanged"]) for r in rows}
    assert sent[("2", "1438")] > 100 * max(sent[("1", "1438")], 1) and sent[("2", "1438")] > sent[("2", "719")]
    model = json.loads((out / "model.json").read_text())
    # Tiny epochs on a shared machine are too noisy to hold the fit to 15% here (the synthetic tests
    # check the fit); the report must agree with itself.
    errors = [abs(p["predicted_seconds"] - p["seconds"]) / p["seconds"] for p in model["points"]]
    assert math.isfinite(model["max_relative_error"]) and model["max_relative_error"] == pytest.approx(max(errors))
    assert {p["workers"] for p in model["points"]} == {1, 2}
    predicted = model["predictions"]["a 1gbit,100us network"]
    assert sorted({p["workers"] for p in predicted}) == [1, 2, 4, 16]
    report = (out / "report.md").read_text()
    assert "1 thread(s) at every worker count" in report and "## Recommendation" in report
    # One batch size cannot separate per-step work: the report says its predictions are optimistic.
    assert "Not fitted from this grid: per-step work not shared by workers (b)" in report
    for plot in ("time_vs_dataset.png", "speedup.png", "efficiency.png", "time_vs_batch.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({plot})" in report
    # A rerun reuses finished runs, but never one trained with other settings.
    run = load_run(out / "runs" / "allreduce-b64-w2-f1-r0")
    same = ["--model", "mlp", "--workers", "2", "--batch-size", "64", "--train-fraction", "1", "--image-size", "8"]
    check_same_settings(run, same)
    with pytest.raises(UserError, match="batch_size=64, not 128"):
        check_same_settings(run, [*same, "--batch-size", "128"])
