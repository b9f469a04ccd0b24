"""Shared fixtures: small generated data sets in every supported layout, and the real CIFAR-10 copy."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
REAL_CIFAR = REPO.parent / "shared" / "datasets" / "cifar10-jpg"


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
    for label in range(classes):
        layout = [("train", train_per_class), ("test", test_per_class)] if split else [("", train_per_class)]
        for part, count in layout:
            folder = root / part / f"class{label}" if part else root / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                make_class_image(label, i + (0 if part != "test" else 10_000), size).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """ROOT/train/<class>/*.png + ROOT/test/<class>/*.png, 3 classes."""
    return write_image_tree(tmp_path / "images")


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


@pytest.fixture
def real_cifar() -> Path:
    if not (REAL_CIFAR / "train").is_dir():
        pytest.skip(f"the real CIFAR-10 copy is not at {REAL_CIFAR}")
    return REAL_CIFAR


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


# The small mlp training that several test files check in their own ways (same weights on 1 and 2
# workers, local SGD against all-reduce, classify and evaluate of a trained model).
MLP_SETTINGS = ["--model", "mlp", "--precision", "fp32", "--epochs", "2", "--batch-size", "16", "--lr", "0.05"]
# The record recipe's tricks that refer to global steps and samples (lookahead, decoupled decay,
# alternating flips, translate, label smoothing, a warmup schedule): with them on, the shared runs
# also show that 2 workers still end with 1 process's weights.
MLP_TRICKS = ["--weight-decay", "0.05", "--label-smoothing", "0.2", "--set", "ema_every=2",
              "--set", "decoupled_weight_decay=true", "--set", "flip=true", "--set", "alternating_flip=true",
              "--set", "translate=2", "--set", "schedule=[[0,0.2],[0.23,1],[1,0.07]]"]


@pytest.fixture(scope="session")
def mlp_data(tmp_path_factory) -> Path:
    """3 easy classes, 24 training and 8 test images each, generated once; read-only for the tests."""
    return write_image_tree(tmp_path_factory.mktemp("mlp") / "data", classes=3, train_per_class=24, test_per_class=8)


def _train_mlp(data: Path, out: Path, workers: int) -> Path:
    # Test-time flips and shifts on, for classify's tests: they change the final evaluation, not the weights.
    result = run_cli(["train", "--data", str(data), "--out", str(out), "--workers", str(workers), *MLP_SETTINGS,
                      *MLP_TRICKS, "--set", "test_time_flip=true", "--set", "test_time_shift=true"],
                     out.parent / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def mlp_run_one_worker(mlp_data: Path, tmp_path_factory) -> Path:
    """Run folder of MLP_SETTINGS trained by one worker, once per session; read-only (copy it to change it)."""
    return _train_mlp(mlp_data, tmp_path_factory.mktemp("mlp-one") / "run", workers=1)


@pytest.fixture(scope="session")
def mlp_run_two_workers(mlp_data: Path, tmp_path_factory) -> Path:
    """Run folder of MLP_SETTINGS trained by two workers (gloo), once per session; read-only."""
    return _train_mlp(mlp_data, tmp_path_factory.mktemp("mlp-two") / "run", workers=2)


def wait_for(condition, timeout: float, what: str):
    """Poll condition until it returns something true (and return that), or fail after timeout seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


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
