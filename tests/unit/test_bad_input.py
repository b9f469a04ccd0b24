"""Bad input: one line on stderr, exit status 2, no traceback, nothing already written destroyed.

All of these are refused by the command itself, before any worker starts, so they run the CLI's
entry point in this process; one more goes through a fresh `python -m distvision`, as a user runs it
(tests/e2e/test_bad_input.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distvision.parallel import live
from tests.helpers import assert_fails_cleanly, write_image_tree


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_image_tree(tmp_path / "data", classes=2, train_per_class=4, test_per_class=2)


def test_empty_data_folder(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    assert_fails_cleanly(["train", "--data", str(tmp_path / "empty")], tmp_path, "empty")


def test_folder_without_readable_images(tmp_path: Path):
    (tmp_path / "junk" / "a").mkdir(parents=True)
    (tmp_path / "junk" / "a" / "x.png").write_bytes(b"junk")
    assert_fails_cleanly(["train", "--data", str(tmp_path / "junk")], tmp_path, "no readable image")


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--model", "alexnet-9000"], "unknown model"),
        (["--workers", "4", "--batch-size", "2"], "smaller than --workers"),
        (["--epochs", "0"], "--epochs"),
        (["--workers", "0"], "--workers"),
        (["--recipe", "nonesuch"], "no recipe"),
        (["--quantize", "int8"], "--quantize int8 applies to the changes of --sync local-sgd or diloco"),
    ],
)
def test_bad_flags(data: Path, tmp_path: Path, flags: list[str], expected: str):
    assert_fails_cleanly(["train", "--data", str(data), *flags], tmp_path, expected)


def test_output_path_that_is_a_file_is_left_alone(data: Path, tmp_path: Path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    assert_fails_cleanly(["train", "--data", str(data), "--out", str(precious)], tmp_path, "is a file")
    assert precious.read_text() == "keep me"


def test_evaluate_without_a_checkpoint(data: Path, tmp_path: Path):
    assert_fails_cleanly(["evaluate", "--checkpoint", str(tmp_path), "--data", str(data)], tmp_path, "no checkpoint")


def test_unknown_recipe_setting(data: Path, tmp_path: Path):
    assert_fails_cleanly(["train", "--data", str(data), "--set", "warp_speed=9"], tmp_path, "--set")


def test_no_network_for_the_default_download_is_one_line(tmp_path: Path):
    from distvision.data.download import download_cifar10
    from distvision.errors import UserError

    with pytest.raises(UserError, match="DATA=") as error:
        download_cifar10(tmp_path, url="http://127.0.0.1:9/cifar-10-python.tar.gz", timeout=5)
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "downloads").glob("*"))  # no partial file left behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_requested_without_a_gpu(data: Path, tmp_path: Path):
    assert_fails_cleanly(["train", "--data", str(data), "--device", "cuda"], tmp_path, "no CUDA GPU")


def test_a_bind_address_not_of_this_machine_and_a_silent_lighthouse(data: Path, tmp_path: Path, monkeypatch):
    """Live membership's addresses are checked before any worker starts (no traceback from the first
    server, no connect timeout in every worker)."""
    monkeypatch.setattr(live, "LIGHTHOUSE_ANSWER_SECONDS", 1.0)  # how long a node waits for it (10 s)
    assert_fails_cleanly(["train", "--data", str(data), "--recovery", "live", "--bind", "10.255.255.1"],
                         tmp_path, "cannot listen on --bind 10.255.255.1")
    assert_fails_cleanly(["train", "--data", str(data), "--lighthouse", "127.0.0.1:1"], tmp_path,
                         "the torchft Lighthouse at 127.0.0.1:1 does not answer")
