"""`distvision classify` end to end with real worker processes: a messy folder tree, 1 vs 2 workers, a
worker killed mid-run and resumed, list files and prepared folders, torchrun, and bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distvision.data.prepare import prepare
from distvision.evaluate import evaluate_checkpoint
from distvision.procfs import local_worker_pids
from tests.helpers import REPO, make_class_image, run_cli, run_cli_in_process, wait_for

CLASSES = 3
# (format, modes it can hold): every mode the issue names, in every format that stores it.
FORMATS = [("png", ["RGB", "L", "RGBA", "P"]), ("jpg", ["RGB", "L"]), ("webp", ["RGB", "RGBA"]),
           ("bmp", ["RGB", "L", "P"])]
MESSY_PER_CLASS = 330


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("classify")


@pytest.fixture(scope="module")
def trained(mlp_run_one_worker: Path, mlp_data: Path) -> tuple[Path, Path]:
    """(run folder, its training data): the tiny mlp of tests/e2e/conftest.py on 3 generated classes, with
    test-time flips on."""
    return mlp_run_one_worker, mlp_data


@pytest.fixture(scope="module")
def messy(workdir: Path) -> tuple[Path, set[str], set[str]]:
    """~1,000 images of mixed sizes, modes and formats in class folders, a symlinked folder, and corrupt
    files; returns (root, relative paths of the good images, relative paths of the bad files)."""
    root = workdir / "messy"
    rng = np.random.default_rng(0)
    good, bad = set(), set()
    for label in range(CLASSES):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(MESSY_PER_CLASS):
            extension, modes = FORMATS[i % len(FORMATS)]
            mode = modes[(i // len(FORMATS)) % len(modes)]
            width, height = (int(v) for v in rng.integers(12, 80, 2))
            image = make_class_image(label, 20_000 + i, 32).resize((width, height)).convert(mode)
            name = f"{i:04d}-{mode}.{extension}"
            image.save(folder / name)
            good.add(f"class{label}/{name}")
    outside = workdir / "elsewhere"  # a linked folder outside the tree is followed
    outside.mkdir()
    for i in range(5):
        make_class_image(2, 30_000 + i, 40).save(outside / f"linked{i}.png")
        good.add(f"class2/extra/linked{i}.png")
    (root / "class2" / "extra").symlink_to(outside)
    valid_png = (root / "class0" / "0000-RGB.png").read_bytes()
    valid_jpg = (root / "class0" / "0001-RGB.jpg").read_bytes()
    corrupt = {"class0/broken.jpg": b"not an image at all", "class0/notes.txt": b"some notes\n",
               "class1/truncated.png": valid_png[: len(valid_png) // 2], "class1/random.bmp": rng.bytes(500),
               "class2/empty.webp": b"", "class2/cut.jpg": valid_jpg[: len(valid_jpg) // 3]}
    for name, content in corrupt.items():
        (root / name).write_bytes(content)
        bad.add(name)
    return root, good, bad


def classify(args: list[str], cache: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    result = run_cli(["classify", *args], cache, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_same_predictions(rows: list[dict], reference: list[dict]) -> None:
    """Same rows, classes and top-k order; probabilities equal to the printed 6 decimals but for a last-digit
    rounding (one worker gets 2 threads, two get 1 each, and the sums inside a matrix product are split
    differently: with equal thread counts the files are byte-identical)."""
    assert [(r["path"], r["predicted_class"], r["top_classes"]) for r in rows] == [
        (r["path"], r["predicted_class"], r["top_classes"]) for r in reference]
    ours = np.array([[float(p) for p in r["top_probabilities"].split(";")] for r in rows])
    theirs = np.array([[float(p) for p in r["top_probabilities"].split(";")] for r in reference])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6)


@pytest.fixture(scope="module")
def one_worker(trained, messy, workdir: Path) -> Path:
    """The reference: the messy tree classified by a single worker."""
    out = workdir / "one" / "predictions.csv"
    classify(["--checkpoint", str(trained[0]), "--input", str(messy[0]), "--out", str(out), "--workers", "1",
              "--chunk-size", "100", "--top-k", "3"], workdir / "cache")
    return out


def test_two_workers_classify_every_good_image_once_and_list_every_bad_file(one_worker, trained, messy, workdir):
    root, good, bad = messy
    out = workdir / "two" / "predictions.csv"
    # Rank 1 is made slow: it should do fewer chunks, and the results must not change.
    classify(["--checkpoint", str(trained[0]), "--input", str(root), "--out", str(out), "--workers", "2",
              "--chunk-size", "100", "--top-k", "3", "--debug-chunk-delay", "1.0", "--debug-slow-rank", "1"],
             workdir / "cache")
    rows = read_csv(out)
    assert list(rows[0]) == ["path", "predicted_class", "probability", "top_classes", "top_probabilities"]
    paths = [row["path"] for row in rows]
    assert paths == sorted(good)  # one row per readable image, sorted, none twice
    errors = read_csv(out.parent / "errors.csv")
    assert {e["path"] for e in errors} == bad and all(e["reason"] for e in errors)
    assert_same_predictions(rows, read_csv(one_worker))

    row = rows[0]
    top = row["top_classes"].split(";")
    probabilities = [float(p) for p in row["top_probabilities"].split(";")]
    assert len(top) == 3 and top[0] == row["predicted_class"] and probabilities == sorted(probabilities, reverse=True)
    assert abs(sum(probabilities) - 1) < 1e-4  # 3 classes: the top 3 are all of them

    summary = json.loads((out.parent / "summary.json").read_text())
    assert summary["images"] == len(good) and summary["unreadable"] == len(bad) and summary["workers"] == 2
    ranks = [json.loads(part.read_text())["rank"] for part in (out.parent / "parts").glob("chunk-*.json")]
    assert ranks.count(1) >= 1 and ranks.count(0) >= 2 * ranks.count(1), ranks  # the slow worker did fewer
    assert summary["chunks"] == summary["chunks_this_run"] == -(-(len(good) + len(bad)) // 100)
    for key in ("steady_state_images_per_second", "end_to_end_images_per_second", "startup_seconds",
                "end_to_end_seconds"):
        assert summary[key] > 0, key
    # Class folders named after the checkpoint's classes: an accuracy report.
    correct = sum(row["path"].split("/")[0] == row["predicted_class"] for row in rows)
    assert summary["accuracy"] == correct / len(rows) and summary["accuracy"] > 0.5
    per_class = read_csv(out.parent / "per_class.csv")
    assert [r["class"] for r in per_class] == [f"class{i}" for i in range(CLASSES)]
    assert sum(int(r["support"]) for r in per_class) == len(rows)
    confusion = read_csv(out.parent / "confusion_matrix.csv")
    assert sum(int(r[f"class{i}"]) for r in confusion for i in range(CLASSES)) == len(rows)
    assert sum(int(r[r["true\\predicted"]]) for r in confusion) == correct
    with Image.open(out.parent / "confusion_matrix.png") as png:
        assert png.format == "PNG" and png.size[0] > 200


def _start(args: list[str], cache: Path) -> subprocess.Popen:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "distvision", "classify", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_a_killed_worker_loses_no_work_and_the_rerun_completes_without_duplicates(one_worker, trained, messy,
                                                                                   workdir):
    out = workdir / "killed" / "predictions.csv"
    args = ["--checkpoint", str(trained[0]), "--input", str(messy[0]), "--out", str(out), "--workers", "2",
            "--chunk-size", "50", "--top-k", "3"]
    run = _start([*args, "--max-restarts", "0", "--debug-chunk-delay", "0.4"], workdir / "cache")
    parts = out.parent / "parts"
    wait_for(lambda: len(list(parts.glob("chunk-*.json"))) >= 4, 120, "chunks to be finished")
    workers = wait_for(lambda: local_worker_pids(run.pid), 10, "worker processes")
    os.kill(workers[1], signal.SIGKILL)
    output = run.communicate(timeout=60)[0]
    assert run.returncode == 1, output[-3000:]
    assert "run the same command again" in output and "Traceback" not in output.split("distvision: error")[-1]
    done_before = len(list(parts.glob("chunk-*.json")))
    total = -(-(len(messy[1]) + len(messy[2])) // 50)
    assert 4 <= done_before < total and not out.exists()

    rerun = classify(args, workdir / "cache")  # --resume is the default when parts exist
    assert f"{done_before} chunk(s) already done, resuming" in rerun.stdout
    summary = json.loads((out.parent / "summary.json").read_text())
    assert summary["chunks_this_run"] == total - done_before
    assert_same_predictions(read_csv(out), read_csv(one_worker))  # complete, each image once
    assert {e["path"] for e in read_csv(out.parent / "errors.csv")} == messy[2]


def test_parts_of_another_job_are_not_mixed_in(one_worker, trained, messy, workdir):
    # Refused before any worker starts: the CLI's entry point in this process is enough.
    result = run_cli_in_process(["classify", "--checkpoint", str(trained[0]), "--input", str(messy[0]), "--out",
                                 str(one_worker), "--chunk-size", "100", "--top-k", "2"], workdir / "cache")
    assert result.returncode == 2 and "top_k changed" in result.stderr and "--no-resume" in result.stderr
    assert len(read_csv(one_worker)) == len(messy[1])  # the finished results are untouched


def test_list_file_and_prepared_folder_inputs(trained, workdir):
    run, data = trained
    listing = workdir / "lists" / "images.txt"
    listing.parent.mkdir()
    test_files = sorted((data / "test").rglob("*.png"))
    lines = ["# images to classify", str(test_files[0]), os.path.relpath(test_files[1], listing.parent), "",
             str(test_files[0]), str(workdir / "missing.png")]
    listing.write_text("\n".join(lines) + "\n")
    out = workdir / "lists" / "predictions.csv"
    classify(["--checkpoint", str(run), "--input", str(listing), "--out", str(out), "--workers", "1"], workdir / "cache")
    assert sorted(row["path"] for row in read_csv(out)) == sorted(lines[1:3])  # as listed, each once
    errors = read_csv(out.parent / "errors.csv")
    assert [e["path"] for e in errors] == [lines[-1]] and "FileNotFoundError" in errors[0]["reason"]
    assert not (out.parent / "per_class.csv").exists()  # a list has no labels

    prepared = workdir / "prepared"
    manifest = prepare(data, prepared, image_size=32, processes=1)
    out = workdir / "from-prepared" / "predictions.csv"
    classify(["--checkpoint", str(run), "--input", str(prepared), "--out", str(out), "--workers", "2",
              "--chunk-size", "10"], workdir / "cache")
    rows = read_csv(out)
    assert len(rows) == manifest["train_count"] + manifest["test_count"]
    test_labels = np.load(prepared / "test_labels.npy")
    test_rows = [row for row in rows if row["path"].startswith("test/")]
    correct = sum(row["predicted_class"] == f"class{label}" for row, label in zip(test_rows, test_labels))
    # The same inference code as `distvision evaluate`: the same test accuracy.
    assert correct / len(test_rows) == evaluate_checkpoint(run, prepared)["test_accuracy"]


def test_torchrun_runs_classify(trained, workdir):
    run, data = trained
    out = workdir / "torchrun" / "predictions.csv"
    env = dict(os.environ, XDG_CACHE_HOME=str(workdir / "cache"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "distvision", "classify", "--checkpoint", str(run), "--input", str(data / "test"),
               "--out", str(out), "--chunk-size", "5"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out.parent / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["images"] == CLASSES * 8 and summary["accuracy"] > 0.5
    assert len(read_csv(out)) == CLASSES * 8


@pytest.mark.parametrize("case, expected", [
    ("missing checkpoint", "holds no checkpoint"),
    ("missing input", "does not exist"),
    ("empty input", "holds no files"),
    ("out is a folder", "is a folder"),
    ("bad top-k", "--top-k"),
])
def test_bad_input_fails_with_one_line(case: str, expected: str, trained, workdir, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    args = {"--checkpoint": str(trained[0]), "--input": str(trained[1] / "test"),
            "--out": str(tmp_path / "p.csv")}
    args.update({
        "missing checkpoint": {"--checkpoint": str(tmp_path / "no-run")},
        "missing input": {"--input": str(tmp_path / "nowhere")},
        "empty input": {"--input": str(tmp_path / "empty")},
        "out is a folder": {"--out": str(tmp_path / "empty")},
        "bad top-k": {"--top-k": "0"},
    }[case])
    # Refused before any worker starts: the CLI's entry point in this process (the train command's
    # bad input has one test through a fresh process, in tests/e2e/test_bad_input.py).
    result = run_cli_in_process(["classify", *[v for pair in args.items() for v in pair]], workdir / "cache")
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("distvision: error:") and expected in lines[0], result.stderr
