"""The end-to-end tier: every test here starts processes, so every one is marked slow; and the fixtures
that train a run once per session for several test files, and the real CIFAR-10 copy."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from tests.helpers import (
    ELASTIC_REFERENCE,
    MLP_SETTINGS,
    MLP_TRICKS,
    REAL_CIFAR,
    elastic_train_args,
    run_cli,
    write_image_tree,
)

E2E = Path(__file__).parent


# The files that take longest, first: `make test` runs two files at a time (pytest-xdist, --dist
# loadfile), and a long file started last would keep one worker busy while the other waits.
LONGEST_FIRST = ("test_live.py", "test_tune.py", "test_train_each.py", "test_elastic.py", "test_training.py", "test_classify.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of this folder slow (`-m "not slow"` leaves the unit tier); longest files first."""
    for item in items:
        if item.path.is_relative_to(E2E):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
               else len(LONGEST_FIRST))  # stable: each file's tests keep their order


@pytest.fixture
def real_cifar() -> Path:
    if not (REAL_CIFAR / "train").is_dir():
        pytest.skip(f"the real CIFAR-10 copy is not at {REAL_CIFAR}")
    return REAL_CIFAR


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


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A folder made by make(folder) once for the whole test run: shared by the pytest-xdist workers
    (under a lock in their common temporary root), and by the test files of one worker."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if root.name.startswith("popen-") else root  # xdist: one basetemp per worker
    folder = root / "made-once" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".done").exists():
            make(folder)
            (folder / ".done").touch()
    return folder


# The elastic and live tests' data (3 classes of 40 training images: 15 steps an epoch at batch 8) and
# the undisturbed run every interrupted run of theirs must end like: the same weights whatever happened.
@pytest.fixture(scope="session")
def elastic_data(tmp_path_factory) -> Path:
    """3 classes of 40 training images; read-only for the tests."""
    return made_once(tmp_path_factory, "elastic-data", lambda folder: write_image_tree(
        folder, classes=3, train_per_class=40, test_per_class=4))


@pytest.fixture(scope="session")
def undisturbed_run(elastic_data: Path, tmp_path_factory) -> Path:
    """An undisturbed 2-worker run on the restart path (DDP); read-only."""
    def make(folder: Path) -> None:
        result = run_cli(elastic_train_args(elastic_data, folder / "run", "--workers", "2", "--recovery", "restart",
                                            *ELASTIC_REFERENCE),
                         folder / "cache")
        assert result.returncode == 0, result.stderr[-2000:]

    return made_once(tmp_path_factory, "undisturbed-run", make) / "run"
