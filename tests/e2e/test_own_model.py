"""A model written in a file outside the package, trained on 2 workers from a CSV list, then evaluated and
used by classify from another folder; the same through the Python API (docs/your-model.md)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import REPO, assert_fails_cleanly, make_class_image, run_cli

MODEL_FILE = '''
from torch import nn

def small_cnn(num_classes, image_size):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(8 * 16, num_classes))

def wrong_head(num_classes):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes + 2))
'''
# The plain recipe's one cycle needs a few steps to learn the easy generated classes.
SETTINGS = ["--epochs", "4", "--batch-size", "16", "--lr", "0.1", "--precision", "fp32", "--image-size", "24"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A user's folder: lab/nets.py, and images/ listed in images.csv with a split column (sizes and modes
    vary, and one listed file is missing)."""
    root = tmp_path_factory.mktemp("own-model")
    (root / "lab").mkdir()
    (root / "lab" / "nets.py").write_text(MODEL_FILE)
    (root / "images").mkdir()
    rows = []
    for label, name in enumerate(["ant", "bee", "cow"]):
        for index in range(32):
            split = "test" if index % 4 == 0 else "train"
            path = f"images/{name}-{index}.png"
            image = make_class_image(label, index, size=28 + index % 3 * 4)
            (image.convert("L") if index % 5 == 0 else image).save(root / path)
            rows.append({"path": path, "label": name, "split": split})
    rows.append({"path": "images/gone.png", "label": "ant", "split": "train"})
    with open(root / "images.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_own_model_file_trains_on_two_workers_from_a_csv_and_its_checkpoint_is_used(project, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["train", "--data", "images.csv", "--model", "lab/nets.py:small_cnn", "--workers", "2",
                      "--out", str(run_dir), *SETTINGS], tmp_path / "cache", cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["model"] == "lab/nets.py:small_cnn"
    assert summary["world_size"] == 2 and summary["test_accuracy"] >= 0.9, summary["test_accuracy"]
    assert summary["train_count"] == 72  # the missing file skipped, and said
    assert [Path(p).name for p in summary["skipped_files"]] == ["gone.png"]
    assert "skipped 1 unreadable file" in result.stdout

    # From another folder: the checkpoint names the file by its absolute path.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli(["evaluate", "--checkpoint", str(run_dir), "--data", str(project / "images.csv")],
                     tmp_path / "cache", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["test_accuracy"] == summary["test_accuracy"]
    predictions = elsewhere / "predictions.csv"
    result = run_cli(["classify", "--checkpoint", str(run_dir), "--input", str(project / "images"),
                      "--out", str(predictions), "--workers", "1"], tmp_path / "cache", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(predictions.read_text().splitlines()))
    assert len(rows) == 96
    correct = sum(row["predicted_class"] == Path(row["path"]).name.split("-")[0] for row in rows)
    assert correct / len(rows) >= 0.9


def test_a_model_with_the_wrong_head_fails_in_one_line(project, tmp_path, monkeypatch):
    monkeypatch.chdir(project)
    assert_fails_cleanly(["train", "--data", "images.csv", "--model", "lab/nets.py:wrong_head", "--workers", "2",
                          "--out", str(tmp_path / "run")], tmp_path, "not (2, 3) logits")
    assert_fails_cleanly(["train", "--data", "images.csv", "--model", "lab.missing:net", "--out",
                          str(tmp_path / "run")], tmp_path, "cannot import 'lab.missing'")


API_SCRIPT = '''
import json, sys
import distvision
from nets import small_cnn

if __name__ == "__main__":
    out = sys.argv[1]
    summary = distvision.train(data="images.csv", model=small_cnn, workers=2, out=out, epochs=4, batch_size=16,
                               lr=0.1, precision="fp32", image_size=24)
    checked = distvision.evaluate(checkpoint=out, data="images.csv")
    classified = distvision.classify(checkpoint=out, input="images", out=out + "/predictions.csv", workers=1)
    try:
        distvision.train(data="images.csv", model=small_cnn, wokers=2)
    except distvision.UserError as error:
        refused = str(error)
    print(json.dumps({"summary": summary, "evaluate": checked, "classify": classified, "refused": refused}))
'''


def test_the_python_api_trains_evaluates_and_classifies(project, tmp_path):
    script = tmp_path / "train_nets.py"
    script.write_text(textwrap.dedent(API_SCRIPT))
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(project / "lab"), str(REPO)]))
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], cwd=project, env=env,
                            capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    summary = report["summary"]
    assert summary["config"]["model"] == "nets:small_cnn" and summary["world_size"] == 2
    assert summary["test_accuracy"] >= 0.9
    assert report["evaluate"]["test_accuracy"] == summary["test_accuracy"]
    assert report["classify"]["images"] == 96
    assert "unknown keyword 'wokers'; did you mean 'workers'?" in report["refused"]
