"""Training end to end with real worker processes (gloo), through the same CLI users run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distvision.metrics import read_metrics
from distvision.models import create
from tests.helpers import run_cli, run_cli_in_process, write_image_tree


def _train(data: Path, out: Path, cache: Path, *extra: str):
    result = run_cli(["train", "--data", str(data), "--out", str(out), *extra], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_workers_reach_the_same_weights_as_one_process(mlp_run_one_worker: Path, mlp_run_two_workers: Path):
    """Data parallelism's defining property: 2 workers with global batch B == 1 process with batch B,
    with the record recipe's step- and sample-based tricks on (tests.helpers.MLP_TRICKS)."""
    one = load_file(mlp_run_one_worker / "checkpoint" / "model.safetensors")
    two = load_file(mlp_run_two_workers / "checkpoint" / "model.safetensors")
    torch.manual_seed(0)
    initial = create("mlp", num_classes=3).state_dict()
    for name, initial_value in initial.items():
        assert not torch.allclose(one[name], initial_value), f"{name} did not train"
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    assert read_metrics(mlp_run_two_workers)[-1]["world_size"] == 2
    recipe = json.loads((mlp_run_two_workers / "summary.json").read_text())["recipe"]
    assert recipe["ema_every"] == 2 and recipe["decoupled_weight_decay"] and recipe["alternating_flip"]


def test_cli_trains_evaluates_and_reports(tmp_path: Path):
    data = write_image_tree(tmp_path / "data", classes=3, train_per_class=30, test_per_class=10)
    (data / "train" / "class0" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "run"
    result = _train(data, out, tmp_path / "cache", "--model", "caffe-quick", "--workers", "2", "--epochs", "3",
                    "--batch-size", "10", "--val-fraction", "0.2", "--lr", "0.01")
    assert "skipped 1 unreadable file" in result.stdout
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    for key in ["train_loss", "test_loss", "test_accuracy", "val_accuracy", "images_per_second",
                "epoch_seconds", "world_size"]:
        assert key in metrics[-1], key
    summary = json.loads((out / "summary.json").read_text())
    for key in ["model", "recipe", "precision", "epochs", "world_size", "global_batch_size", "test_accuracy",
                "best_test_accuracy", "images_per_second", "train_seconds", "wall_seconds", "stop_reason",
                "skipped_files"]:
        assert key in summary, key
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 10
    assert summary["precision"] in ("fp32", "bf16") and "measured" in summary["precision_choice"]
    assert summary["train_count"] == 72 and summary["val_count"] == 18
    assert [Path(p).name for p in summary["skipped_files"]] == ["broken.jpg"]
    assert summary["test_accuracy"] > 0.5  # 3 easy classes: far above the 33% of chance
    # No test-time augmentation: the final figure is the last epoch's evaluation of the same weights.
    assert summary["test_accuracy"] == metrics[-1]["test_accuracy"]
    # evaluate starts no worker: its entry point in this process spares a second `import torch`.
    evaluated = run_cli_in_process(["evaluate", "--checkpoint", str(out), "--data", str(data)], tmp_path / "cache")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["test_accuracy"] == summary["test_accuracy"]


def test_corrupt_checkpoint_is_detected(mlp_run_one_worker: Path, mlp_data: Path, tmp_path: Path):
    run = shutil.copytree(mlp_run_one_worker, tmp_path / "run")
    weights = run / "checkpoint" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF
    weights.write_bytes(bytes(raw))
    result = run_cli_in_process(["evaluate", "--checkpoint", str(run), "--data", str(mlp_data)], tmp_path / "cache")
    assert result.returncode == 2 and "corrupt" in result.stderr and "Traceback" not in result.stderr


def real_cifar_subset(real_cifar: Path, root: Path, train_per_class: int) -> Path:
    """Links to the whole real test set and to the first train_per_class training images of each class."""
    for class_folder in sorted((real_cifar / "train").iterdir()):
        (root / "train" / class_folder.name).mkdir(parents=True)
        for image in sorted(class_folder.iterdir())[:train_per_class]:
            (root / "train" / class_folder.name / image.name).symlink_to(image)
    (root / "test").symlink_to(real_cifar / "test")
    return root


@pytest.mark.timeout(600)
def test_real_cifar10_two_workers_beat_chance(real_cifar: Path, tmp_path: Path):
    out = tmp_path / "run"
    # 15 seconds of training (about 16,000 images here) keep the suite quick, and so does preparing
    # only the 20,000 training images they can reach (decoding all 60,000 JPEGs took about 30 s);
    # the final evaluation still covers all 10,000 real test images.
    data = real_cifar_subset(real_cifar, tmp_path / "cifar10-subset", train_per_class=2000)
    _train(data, out, tmp_path / "cache", "--model", "caffe-quick", "--workers", "2", "--epochs", "1",
           "--max-time", "15")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_count"] == 20_000 and summary["world_size"] == 2
    assert json.loads((Path(summary["prepared_data"]) / "manifest.json").read_text())["test_count"] == 10_000
    assert summary["test_accuracy"] > 0.25, summary["test_accuracy"]  # chance is 0.10
