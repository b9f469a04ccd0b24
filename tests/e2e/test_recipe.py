"""fastnet's record recipe in real runs, and Lookahead across real gloo workers (each trick on its own:
tests/unit/test_recipe.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from distvision.parallel.group import leave_process_group
from distvision.tricks import Lookahead
from tests.helpers import assert_each_epoch_covered_once, run_cli, spawn_workers, write_image_tree


def _finish_lookahead_on_diverged_replicas(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # replicas that differ, as between local-SGD averagings
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    lookahead = Lookahead(model, every=1)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    lookahead.maybe_update(model, step=1, progress=0.8)
    lookahead.finish(model)
    state = torch.cat([t.flatten() for t in model.state_dict().values() if t.is_floating_point()])
    gathered = [torch.zeros_like(state) for _ in range(2)]
    dist.all_gather(gathered, state)
    if rank == 0:
        Path(results).write_text(json.dumps(torch.equal(gathered[0], gathered[1])))
    leave_process_group(barrier=False)


def test_lookahead_ends_with_one_model_on_every_worker(tmp_path: Path):
    """Under local SGD each replica keeps its own average: finishing must leave identical weights."""
    results = tmp_path / "same.json"
    spawn_workers(_finish_lookahead_on_diverged_replicas, (str(tmp_path / "init"), str(results)))
    assert json.loads(results.read_text()) is True


def test_fastnet_recipe_trains_on_two_workers_and_evaluate_agrees(tmp_path: Path):
    data = write_image_tree(tmp_path / "data", classes=3, train_per_class=24, test_per_class=6)
    out = tmp_path / "run"
    result = run_cli(["train", "--data", str(data), "--out", str(out), "--model", "fastnet", "--workers", "2",
                      "--epochs", "4", "--batch-size", "24", "--lr-scaling", "linear", "--precision", "fp32",
                      "--sync", "local-sgd", "--sync-every", "2"],
                     tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    recipe = summary["recipe"]
    assert recipe["whiten"] and recipe["frozen_norm_scale"] and recipe["ema_every"] == 5
    assert recipe["lr"] == pytest.approx(1.5 * 24 / 1024)  # the recipe's lr, for batch 1024, scaled
    assert "test_accuracy_without_tta" in summary
    assert summary["test_accuracy"] >= 0.8  # it learns (3 easy classes; chance is 1/3)
    weights = load_file(out / "checkpoint" / "model.safetensors")
    stem = weights["0.weight"]  # whitening filters and their negatives, untouched by training
    assert torch.equal(stem[12:], -stem[:12]) and (weights["2.norm1.weight"] == 1).all()
    evaluated = run_cli(["evaluate", "--checkpoint", str(out), "--data", str(data)], tmp_path / "cache")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["test_accuracy"] == summary["test_accuracy"]  # the same 6 views


def test_sync_bn_on_the_cpu_is_a_clear_error(tmp_path: Path):
    result = run_cli(["train", "--data", str(tmp_path), "--device", "cpu", "--sync-bn"], tmp_path / "cache")
    assert result.returncode == 2 and "SyncBatchNorm" in result.stderr and "Traceback" not in result.stderr


def test_fastnet_under_live_membership_survives_kills(tmp_path: Path):
    """Batch normalisation under live membership: two kills (one after a step, one while the round's
    all-reduce is in flight) cost the run no restart and no sample, the rolled-back rounds leave the
    running statistics sound, and the model learns as undisturbed (the same accuracy, not the same bits:
    each replica normalises over its own share)."""
    data = write_image_tree(tmp_path / "data", classes=3, train_per_class=24, test_per_class=6)
    out = tmp_path / "run"
    result = run_cli(["train", "--data", str(data), "--out", str(out), "--model", "fastnet", "--workers", "2",
                      "--epochs", "4", "--batch-size", "24", "--lr-scaling", "linear", "--precision", "fp32",
                      "--recovery", "live", "--heartbeat-timeout", "0.5", "--collective-timeout", "10",
                      "--audit-samples", "--debug-fault", "kill:1:4", "--debug-fault", "kill:0:8:exchange"],
                     tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restarts"] == 0 and summary["membership_changes"] >= 1, summary
    assert (out / "debug-fault-0").exists() and (out / "debug-fault-1").exists()
    assert_each_epoch_covered_once(out, 4, sample_count=72)
    weights = load_file(out / "checkpoint" / "model.safetensors")
    statistics = [value for name, value in weights.items() if name.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.isfinite(value).all() for value in statistics)
    assert summary["test_accuracy"] >= 0.8, summary  # as undisturbed (chance is 1/3)
