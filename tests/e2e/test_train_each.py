"""`distvision train-each`: independent models per subset, in a pool, on one shared output folder."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distvision.inference import load_inference_model
from distvision.metrics import read_events
from tests.helpers import REPO, make_class_image, run_cli, run_cli_in_process

FAST = ["--model", "caffe-quick", "--epochs", "3", "--batch-size", "10", "--lr", "0.002", "--precision", "fp32"]
# Each class name has its own learnable look (make_class_image's label), whichever subset holds it.
LOOKS = {name: i for i, name in enumerate(["car", "ship", "truck", "cat", "dog", "deer", "horse", "x", "y",
                                            "oak", "pine", "palm", "cactus"])}


def write_subset(root: Path, name: str, classes: list[str], train: int = 24, test: int = 8) -> Path:
    """ROOT/<name>/{train,test}/<class>/*.png; each class name has its own learnable look."""
    for class_name in classes:
        look = LOOKS[class_name]
        for split, count in (("train", train), ("test", test)):
            folder = root / name / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                make_class_image(look, i + (10_000 if split == "test" else 0)).save(folder / f"{i:03d}.png")
    return root / name


@pytest.fixture(scope="module")
def subsets(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("each")
    root = tmp_path / "subsets"
    write_subset(root, "vehicles", ["car", "ship", "truck"], train=30)
    write_subset(root, "pets", ["cat", "dog"])
    # A subset built from links, as users often do.
    write_subset(tmp_path / "elsewhere", "wild", ["deer", "horse"])
    (root / "wild").symlink_to(tmp_path / "elsewhere" / "wild")
    write_subset(root, "lonely", ["cat"])  # one class: reported, not trained
    return root


@pytest.fixture(scope="module")
def trained(subsets: Path) -> tuple[Path, object]:
    out = subsets.parent / "each"
    result = run_cli(["train-each", "--data", str(subsets), "--parallel", "2", "--compare-global",
                      "--out", str(out), *FAST], subsets.parent / "cache", timeout=400)
    return out, result


def read_rows(each_dir: Path) -> dict[str, dict]:
    with open(each_dir / "subsets.csv", newline="") as handle:
        return {row["subset"]: row for row in csv.DictReader(handle)}


def _global_accuracy(each_dir: Path, test_folder: Path) -> float:
    """The global model's accuracy on one folder of test images, all its classes competing."""
    loaded = load_inference_model(each_dir / "_global", torch.device("cpu"))
    paths = sorted(test_folder.glob("*/*.png"))
    images = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])
    predicted = loaded.logits(images).argmax(1).tolist()
    return sum(loaded.classes[p] == path.parent.name for p, path in zip(predicted, paths)) / len(paths)


def test_parallel_pool_trains_every_subset_and_compares_with_a_global_model(subsets: Path, trained, tmp_path: Path):
    out, result = trained
    assert result.returncode == 1, result.stderr  # 'lonely' cannot be trained; the others are
    assert "lonely: not trained" in result.stdout and "only one class" in result.stdout
    rows = read_rows(out)
    assert set(rows) == {"vehicles", "pets", "wild", "_global"}
    for name, chance in (("vehicles", 1 / 3), ("pets", 0.5), ("wild", 0.5)):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["epochs"] == 3
        assert float(rows[name]["test_accuracy"]) == summary["test_accuracy"] > chance + 0.2
        # The global model on the subset's own test images, recomputed here from the image files.
        assert float(rows[name]["global_test_accuracy"]) == pytest.approx(
            _global_accuracy(out, subsets / name / "test"))
        # The global model again, choosing among the subset's classes only (as the subset model does).
        among_subset = float(rows[name]["global_test_accuracy_subset_classes"])
        assert float(rows[name]["global_test_accuracy"]) <= among_subset <= 1
        assert rows[name]["host"] and float(rows[name]["seconds"]) > 0
    assert int(rows["vehicles"]["classes"]) == 3 and int(rows["vehicles"]["samples"]) == 90
    global_summary = json.loads((out / "_global" / "summary.json").read_text())
    assert global_summary["train_count"] == 90 + 48 + 48  # the union of the subsets' training images
    assert (out / "comparison.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert "lonely" in summary["not_trainable"] and not summary["failed"]

    # Running again trains nothing: every subset is finished (so it starts no process: the CLI's
    # entry point in this process is enough).
    again = run_cli_in_process(["train-each", "--data", str(subsets), "--out", str(out), *FAST], tmp_path / "cache")
    assert " done:" not in again.stdout, again.stdout
    assert set(read_rows(out)) == {"vehicles", "pets", "wild"}


def test_manifest_subsets_and_array_index(tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    lines = ["path,label,subset"]
    for subset, labels in (("north", ["oak", "pine"]), ("south", ["palm", "cactus"])):
        for label in labels:
            for i in range(20):
                make_class_image(LOOKS[label], i).save(images / f"{subset}-{label}-{i}.png")
                lines.append(f"images/{subset}-{label}-{i}.png,{label},{subset}")
    lines += ["images/missing.png,oak,north", "images/x.png,oak,bad name"]
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "each"
    # Job order is by name ('bad name' is listed but untrainable, then north, south): index 2 is 'south'.
    result = run_cli(["train-each", "--data", str(tmp_path / "manifest.csv"), "--only-index", "2",
                      "--out", str(out), *FAST], tmp_path / "cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(read_rows(out)) == {"south"}
    assert "missing.png" in result.stdout and "not a safe folder name" in result.stdout
    assert json.loads((out / "south" / "summary.json").read_text())["test_accuracy"] > 0.7
    # Another job by name, each subset's training data-parallel on two workers; south is kept as it was.
    kept = (out / "south" / "summary.json").read_text()
    result = run_cli(["train-each", "--data", str(tmp_path / "manifest.csv"), "--only", "north",
                      "--workers-per-job", "2", "--out", str(out), *FAST], tmp_path / "cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((out / "north" / "summary.json").read_text())["world_size"] == 2
    assert set(read_rows(out)) == {"north", "south"} and (out / "south" / "summary.json").read_text() == kept


def test_two_processes_split_the_subsets_and_take_over_from_a_dead_one(tmp_path: Path):
    root = tmp_path / "subsets"
    for name in ("a", "b"):
        write_subset(root, name, ["x", "y"], train=40)
    out = tmp_path / "each"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    slow = ["--debug-step-delay", "0.3", "--checkpoint-every", "1"]
    command = [sys.executable, "-m", "distvision", "train-each", "--data", str(root), "--out", str(out),
               "--lease-seconds", "4", *FAST]

    def start(log: str, extra: list[str]) -> subprocess.Popen:
        return subprocess.Popen(command + extra, cwd=REPO, env=env, stdout=open(tmp_path / log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    # The first process claims a subset and dies with everything it started (as a machine would).
    doomed = start("doomed.log", slow)
    claims = out / ".claims"
    deadline = time.time() + 120
    while time.time() < deadline and not any(
        list((out / n / "checkpoints").glob("step-*")) for n in ("a", "b") if (out / n).is_dir()
    ):
        time.sleep(0.3)
    claimed = [p.stem for p in claims.glob("*.claim")]
    assert len(claimed) == 1, claimed
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()
    assert not (out / claimed[0] / "summary.json").exists()

    first, second = start("first.log", []), start("second.log", [])
    assert first.wait(timeout=300) == 0 and second.wait(timeout=300) == 0
    logs = [(tmp_path / name).read_text() for name in ("first.log", "second.log")]
    trained = [line.split()[1] for log in logs for line in log.splitlines() if " done:" in line]
    assert sorted(trained) == ["a", "b"], logs  # each subset exactly once between them
    assert any(e["event"] == "resume" for e in read_events(out / claimed[0])), "not resumed from its checkpoint"
    assert set(read_rows(out)) == {"a", "b"}  # the report lists both, whichever process wrote it last


def test_routed_classify_sends_each_image_to_its_subset_model(trained, tmp_path: Path):
    each_dir, _ = trained
    new_images = tmp_path / "new"
    write_subset(new_images, "vehicles", ["car", "truck"], train=0, test=5)
    write_subset(new_images, "pets", ["dog"], train=0, test=5)
    write_subset(new_images, "mars", ["car"], train=0, test=2)  # a subset no model was trained for
    out = tmp_path / "predictions" / "predictions.csv"
    result = run_cli(["classify", "--checkpoint", str(each_dir), "--input", str(new_images), "--out", str(out),
                      "--workers", "1"], tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 15 and list(rows[0])[:5] == ["path", "predicted_class", "probability", "top_classes",
                                                      "top_probabilities"]
    for row in rows:
        subset = row["path"].split("/")[0]
        assert row["subset"] == row["model"] == subset
        own_classes = {"vehicles": {"car", "ship", "truck"}, "pets": {"cat", "dog"}}[subset]
        # The right model: only its own classes can come out.
        assert set(row["top_classes"].split(";")) <= own_classes and row["predicted_class"] in own_classes
    correct = sum(row["predicted_class"] == row["path"].split("/")[2] for row in rows)
    assert correct >= 13
    with open(out.parent / "errors.csv", newline="") as handle:
        errors = list(csv.DictReader(handle))
    assert len(errors) == 2 and all("no model for subset 'mars'" in e["reason"] for e in errors)

    fallback = tmp_path / "fallback" / "predictions.csv"
    result = run_cli(["classify", "--checkpoint", str(each_dir), "--input", str(new_images), "--out",
                      str(fallback), "--workers", "1", "--fallback", "global"], tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(fallback, newline="") as handle:
        models = {row["path"].split("/")[0]: row["model"] for row in csv.DictReader(handle)}
    assert models == {"vehicles": "vehicles", "pets": "pets", "mars": "_global"}
