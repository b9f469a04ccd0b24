"""The unit tier starts no process: no subprocess, no multiprocessing (torch's included), no launcher.

A test that tries fails, and belongs in tests/e2e; that keeps this tier quick on a loaded 2-core machine.
"""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess

import pytest


@pytest.fixture(autouse=True)
def no_process_is_started(monkeypatch):
    """Refuse subprocess, multiprocessing and fork, and fail the test even if the refusal was caught."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("a unit test started a process: it belongs in tests/e2e")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)  # run, call, check_output, Popen
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)  # Process, Pool, torch's spawn
    monkeypatch.setattr(os, "fork", refuse)  # os.system is left alone: a test pickles a reference to it
    yield
    if attempts:
        pytest.fail(f"started {len(attempts)} process(es): a unit test belongs in tests/e2e if it needs one")
