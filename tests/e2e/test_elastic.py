"""Fault tolerance with real processes: dead workers, resumes at other world sizes, a clean stop on
SIGTERM, missing workers at rendezvous (nodes joining and a stopped node leaving:
tests/e2e/test_elastic_membership.py; corrupt checkpoints: tests/unit/test_elastic.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distvision.checkpoint import list_training_checkpoints
from distvision.metrics import read_events, read_metrics
from distvision.parallel.launch import PRIVATE_STORE_VARIABLE
from distvision.procfs import local_worker_pids
from distvision.training.faults import STOP_GRACE_SECONDS
from tests.helpers import (
    ELASTIC_REFERENCE,
    REPO,
    assert_each_epoch_covered_once,
    assert_same_weights,
    elastic_train_args,
    free_port,
    run_cli,
    run_cli_in_process,
    wait_for,
)


@pytest.fixture(scope="module")
def data(elastic_data: Path) -> Path:
    return elastic_data


# With the record recipe's tricks that refer to global steps and samples (lookahead, decoupled decay,
# alternating flips, translate, label smoothing, a warmup schedule): they too must resume exactly.
UNINTERRUPTED = ELASTIC_REFERENCE


@pytest.fixture(scope="module")
def uninterrupted(undisturbed_run: Path) -> Path:
    """The run folder of an undisturbed 2-worker run that the interrupted runs must end like."""
    return undisturbed_run


def _env(tmp_path: Path) -> dict:
    # The torchrun agents need the rendezvous store kept from their workers (see launch.py).
    return dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONUNBUFFERED="1",
                **{PRIVATE_STORE_VARIABLE: "1"})


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """The restart path explicitly (several local workers run live membership by default)."""
    return elastic_train_args(data, out, "--recovery", "restart", *extra)


def _start(args: list[str], tmp_path: Path, module: list[str] | None = None) -> subprocess.Popen:
    command = [sys.executable, *(module or ["-m", "distvision"]), *args]
    return subprocess.Popen(command, cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _steps_done(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "heartbeat.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_undisturbed(data: Path, uninterrupted: Path,
                                                                          tmp_path: Path):
    out = tmp_path / "run"
    # 15 steps an epoch. Steps of 0.2 s pace the exchanges (and so the checkpoints, due every 0.3 s)
    # to every 5 steps: the kill, right after the heartbeat of step 20, finds a checkpoint in the
    # middle of epoch 2, so the restart resumes mid-epoch.
    run = _start(_train_args(data, out, "--workers", "2", *UNINTERRUPTED, "--debug-step-delay", "0.2",
                             "--checkpoint-every", "0.3"), tmp_path)
    wait_for(lambda: _steps_done(out) >= 20, 120, "training to make progress")
    workers = wait_for(lambda: local_worker_pids(run.pid), 10, "worker processes")
    os.kill(workers[1], signal.SIGKILL)
    output = run.communicate(timeout=180)[0]
    assert run.returncode == 0, output[-3000:]
    # One kill, one resumed group (torch may need a second attempt to regroup: that is not a resume).
    restarts = [e for e in read_events(out) if e["event"] == "restart"]
    assert len(restarts) == 1 and restarts[0]["new_world_size"] == 2
    assert restarts[0]["epoch"] == 2 and restarts[0]["cursor"] > 0, restarts  # resumed mid-epoch
    assert restarts[0]["recovery_seconds"] is not None
    assert "recovered in" in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["epochs"] == 3
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3]
    assert_each_epoch_covered_once(out, 3)
    assert_same_weights(out, uninterrupted)


def test_resume_at_other_world_sizes_matches_an_uninterrupted_run(data: Path, uninterrupted: Path, tmp_path: Path):
    """Stopped twice and resumed at other world sizes, a run ends with an uninterrupted run's weights;
    without --resume an unfinished run is refused, not overwritten."""
    common = UNINTERRUPTED
    out = tmp_path / "pieces"
    for extra in (["--workers", "2", "--debug-stop-at-step", "7"],
                  ["--workers", "1", "--resume", "--debug-stop-at-step", "25"],
                  ["--workers", "2", "--resume"]):
        piece = run_cli(_train_args(data, out, *common, *extra), tmp_path / "cache")
        assert piece.returncode == 0, piece.stderr[-2000:]
        if "--resume" not in extra:
            # Refused by the command before any worker starts: its entry point in this process is enough.
            saved = list_training_checkpoints(out)
            again = run_cli_in_process(_train_args(data, out, *common, "--workers", "2"), tmp_path / "cache")
            assert again.returncode == 2 and "--resume" in again.stderr, again.stderr[-2000:]
            # A resume that would silently train another run (here another lr) is refused too.
            other = run_cli_in_process(_train_args(data, out, *common, "--workers", "2", "--resume", "--lr", "0.1"),
                                       tmp_path / "cache")
            assert other.returncode == 2 and "recipe.lr=0.05, not 0.1 (--lr)" in other.stderr, other.stderr[-2000:]
            assert list_training_checkpoints(out) == saved
    assert_same_weights(out, uninterrupted)
    events = read_events(out)
    assert [(e["event"], e["old_world_size"], e["new_world_size"]) for e in events] == [
        ("resume", 2, 1), ("resume", 1, 2)]
    assert_each_epoch_covered_once(out, 3)


def test_sigterm_stops_workers_and_agent_cleanly_with_a_resumable_checkpoint(data: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = _train_args(data, out, "--workers", "2", "--epochs", "3", "--debug-step-delay", "0.05")
    run = _start(args, tmp_path)
    wait_for(lambda: _steps_done(out) >= 10, 120, "training to make progress")
    workers = local_worker_pids(run.pid)
    signalled = time.monotonic()
    run.send_signal(signal.SIGTERM)
    output = run.communicate(timeout=60)[0]
    # An orderly stop at the next exchange, with its checkpoint, before the watchdog's hard exit
    assert time.monotonic() - signalled < STOP_GRACE_SECONDS, output[-2000:]
    assert "stopped at step" in output and "with a checkpoint" in output, output[-2000:]
    assert run.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "--resume" in output and "Traceback" not in output
    for pid in workers.values():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert list_training_checkpoints(out)
    finished = run_cli(args[:-2] + ["--resume"], tmp_path / "cache")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert_each_epoch_covered_once(out, 3)


def test_missing_workers_at_rendezvous_is_an_error_not_a_hang(data: Path, tmp_path: Path):
    torchrun = ["-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-conf=join_timeout=5", "-m", "distvision"]
    started = time.time()
    lonely = _start(_train_args(data, tmp_path / "run", "--epochs", "1"), tmp_path, module=torchrun)
    output = lonely.communicate(timeout=120)[0]
    assert lonely.returncode != 0 and time.time() - started < 90
    assert "timeout" in output.lower() or "Timeout" in output
