"""Helpers shared by the test files of both tiers: generated data, running the CLI, waiting, free ports.

Imported as `from tests.helpers import ...`; fixtures stay in the conftest.py files.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
REAL_CIFAR = REPO.parent / "shared" / "datasets" / "cifar10-jpg"

# The small mlp training that several test files check in their own ways (same weights on 1 and 2
# workers, local SGD against all-reduce, classify and evaluate of a trained model).
MLP_SETTINGS = ["--model", "mlp", "--precision", "fp32", "--epochs", "2", "--batch-size", "16", "--lr", "0.05"]
# The record recipe's tricks that refer to global steps and samples (lookahead, decoupled decay,
# alternating flips, translate, label smoothing, a warmup schedule): with them on, the shared runs
# also show that 2 workers still end with 1 process's weights.
MLP_TRICKS = ["--weight-decay", "0.05", "--label-smoothing", "0.2", "--set", "ema_every=2",
              "--set", "decoupled_weight_decay=true", "--set", "flip=true", "--set", "alternating_flip=true",
              "--set", "translate=2", "--set", "schedule=[[0,0.2],[0.23,1],[1,0.07]]"]

# The elastic tests' data: 3 classes of 40 training images.
ELASTIC_TRAIN_COUNT = 3 * 40
# Their undisturbed reference run's settings (with the record recipe's tricks that refer to global steps
# and samples: lookahead, decoupled decay, alternating flips, translate, label smoothing, a warmup).
ELASTIC_REFERENCE = ["--epochs", "3", "--checkpoint-every", "1000", *MLP_TRICKS]


def elastic_train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """`distvision train` on the elastic tests' data: mlp, batch 8, every step's samples audited."""
    return ["train", "--data", str(data), "--out", str(out), "--model", "mlp", "--precision", "fp32",
            "--batch-size", "8", "--lr", "0.05", "--audit-samples", *extra]

# distvision tune's tests: the quickest settings a trial can run with.
TUNE_SETTINGS = ["--precision", "fp32", "--model", "caffe-quick"]


def make_class_image(label: int, index: int, size: int = 32) -> Image.Image:
    """A learnable image: each class has its own colour and stripe direction, plus noise."""
    rng = np.random.default_rng(label * 1000 + index)
    base = np.zeros((size, size, 3), dtype=np.float32)
    base[..., label % 3] = 160
    stripes = (np.arange(size) // 4) % 2 * 80
    base += stripes[:, None, None] if label % 2 else stripes[None, :, None]
    base += rng.normal(0, 20, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def write_image_tree(root: Path, classes: int = 3, train_per_class: int = 24, test_per_class: int = 8,
                     split: bool = True, size: int = 32) -> Path:
    """ROOT/{train,test}/class<i>/*.png of make_class_image (ROOT/class<i>/*.png when not split)."""
    for label in range(classes):
        layout = [("train", train_per_class), ("test", test_per_class)] if split else [("", train_per_class)]
        for part, count in layout:
            folder = root / part / f"class{label}" if part else root / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                make_class_image(label, i + (0 if part != "test" else 10_000), size).save(folder / f"{i:04d}.png")
    return root


def write_cifar_batches(folder: Path, per_batch: int = 20, test_count: int = 20) -> Path:
    """Files shaped like the official cifar-10-batches-py (pickled dicts with bytes keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def dump(name: str, count: int) -> None:
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        batch = {b"data": data, b"labels": list(rng.integers(0, 10, count).tolist()), b"batch_label": b"x"}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))

    for i in range(1, 6):
        dump(f"data_batch_{i}", per_batch)
    dump("test_batch", test_count)
    names = [n.encode() for n in ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    return folder


def run_cli(args: list[str], cache_dir: Path, cwd: Path | None = None, timeout: float = 240):
    """Run `python -m distvision ...` as a user would; returns the CompletedProcess."""
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_dir), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "distvision", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def run_cli_in_process(args: list[str], cache_dir: Path) -> subprocess.CompletedProcess:
    """Run `distvision ...` through the CLI's own entry point (main) in this process; returns what
    run_cli would. For commands refused before any worker starts, where a fresh interpreter would
    only add its `import torch` (about 3 s); a traceback propagates and fails the test."""
    from distvision.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    previous_cache = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache_dir)
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            main(args)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        if previous_cache is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = previous_cache
    return subprocess.CompletedProcess(["distvision", *args], code, stdout.getvalue(), stderr.getvalue())


def assert_fails_cleanly(args: list[str], tmp_path: Path, expected: str, own_process: bool = False) -> None:
    """The command exits 2 with one line, `distvision: error: ...` holding expected, and no traceback."""
    result = (run_cli if own_process else run_cli_in_process)(args, tmp_path / "cache")
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("distvision: error:"), result.stderr
    assert expected in lines[0]


def tune_args(data: Path, out: Path, *extra: str) -> list[str]:
    """`distvision tune` arguments for a search on data into out, with TUNE_SETTINGS."""
    return ["tune", "--data", str(data), "--out", str(out), *TUNE_SETTINGS, *extra]


def wait_for(condition, timeout: float, what: str):
    """Poll condition until it returns something true (and return that), or fail after timeout seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_workers(function, args: tuple, nprocs: int = 2, timeout: float = 120) -> None:
    """Run function(rank, *args) in nprocs spawned processes; fail, and kill them, after timeout seconds.

    torch's mp.spawn joins without a limit and its children are not daemons, so one hung collective
    would hang the whole suite (and, at exit, the interpreter that waits for its children).
    """
    import torch.multiprocessing as mp

    context = mp.start_processes(function, args=args, nprocs=nprocs, join=False, daemon=True,
                                 start_method="spawn")
    deadline = time.time() + timeout
    while not context.join(timeout=1):  # False until every process has ended (a failure raises)
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{function.__name__} did not finish within {timeout:.0f} s")


def restart_world_sizes(run_dir: Path) -> list[tuple[int, int]]:
    """(old, new) world size of each restart on record in the run's events."""
    from distvision.metrics import read_events

    return [(e["old_world_size"], e["new_world_size"]) for e in read_events(run_dir) if e["event"] == "restart"]


def assert_each_epoch_covered_once(run_dir: Path, epochs: int, sample_count: int = ELASTIC_TRAIN_COUNT,
                                   whole_dataset: bool = True) -> None:
    """From the audit logs: per epoch, the steps that counted (the latest attempt of each) cover every
    sample exactly once, whatever restarts and world-size changes happened.

    An attempt is a start of the job: the restart path's attempt ids are the start's clock in ns, the
    live path's the launch's clock in ms x 10**6 + the quorum's id (every record there is a committed
    step). Both divided by 10**6 name the start, so within one start every record counts and a step
    trained twice shows as a sample seen twice; a later start (a restart, a resume) supersedes.

    A live record also holds the step's whole global batch ("batch"), which the committed sum holds:
    a round can commit on one replica and fail on another whose share then goes unrecorded, and a
    replica that committed a round and then died or left before anyone took its state over leaves a
    record of a round the others redo (under another quorum). Every committer of a step must name the
    same batch, and none may commit a step twice; the test's weights check covers the rest."""
    attempts: dict[tuple[int, int], dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    committed: dict[tuple[int, int, int], list[int]] = {}  # live: (start, epoch, step) -> its batch
    for path in (run_dir / "audit").glob("*.jsonl"):
        written = set()
        for line in path.read_text().splitlines():
            record = json.loads(line)
            start, key = record["attempt"] // 1_000_000, (record["epoch"], record["step"])
            if "batch" not in record:
                attempts[key][start].extend(record["indices"])
                continue
            assert (start, *key) not in written, f"{path.name} committed epoch {key[0]} step {key[1]} twice"
            written.add((start, *key))
            batch = committed.setdefault((start, *key), record["batch"])
            assert batch == record["batch"], f"replicas committed different batches at {key}"
            assert set(record["indices"]) <= set(record["batch"]), f"{path.name}: a share outside the batch at {key}"
    for (start, *key), batch in committed.items():
        attempts[tuple(key)][start] = batch
    for epoch in range(epochs):
        seen = []
        for (record_epoch, _), by_attempt in attempts.items():
            if record_epoch == epoch:
                seen += by_attempt[max(by_attempt)]
        # whole_dataset: the samples are 0..sample_count-1 (else a seeded share of a larger set)
        expected = list(range(sample_count)) if whole_dataset else sorted(set(seen))
        assert len(seen) == sample_count and sorted(seen) == expected, (
            f"epoch {epoch}: {len(seen)} samples, not each of {sample_count} once")


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    """The run's final weights are the reference run's, up to rounding (the live and elastic tests)."""
    from safetensors.torch import load_file

    expected = load_file(reference / "checkpoint" / "model.safetensors")
    actual = load_file(run_dir / "checkpoint" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-5)
