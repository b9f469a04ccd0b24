"""Bad input through a fresh `python -m distvision`, as a user runs it: one line on stderr, exit status 2,
no traceback (the other cases run the CLI's entry point in this process: tests/unit/test_bad_input.py)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import assert_fails_cleanly


def test_missing_data_path(tmp_path: Path):
    assert_fails_cleanly(["train", "--data", str(tmp_path / "nowhere")], tmp_path, "does not exist", own_process=True)
