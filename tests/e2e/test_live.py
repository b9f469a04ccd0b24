"""Live membership (`--recovery live`, torchft) with real processes: a killed worker, a frozen one, a node
that joins a running job and one that leaves it, a Lighthouse lost and restarted, a hung node under
torchrun. The survivors never restart, every sample is still trained once per epoch, and the run ends
with the weights of the restart path's undisturbed run (the same arithmetic, whoever took part in each
step). Faults at exact phases: test_live_faults.py (a file of its own, so that the suite's two workers
share the live tests)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from distvision.checkpoint import list_training_checkpoints
from distvision.metrics import read_metrics
from distvision.procfs import local_worker_pids
from tests.e2e.live_helpers import (
    EPOCHS,
    LIVE,
    _changes,
    _finish,
    _lighthouse,
    _secret_file,
    _start,
    _steps_done,
    _torchrun_node,
    _train_args,
    _workers,
)
from tests.helpers import assert_each_epoch_covered_once, assert_same_weights, free_port, run_cli, wait_for


@pytest.fixture(scope="module")
def data(elastic_data: Path) -> Path:
    return elastic_data


@pytest.fixture(scope="module")
def reference(undisturbed_run: Path) -> Path:
    """An undisturbed 2-worker run on the restart path (DDP): the weights every live run must end with."""
    return undisturbed_run


def test_a_frozen_worker_is_left_out_and_a_killed_one_respawned_without_restarting_the_other(
        data: Path, reference: Path, tmp_path: Path):
    out = tmp_path / "run"
    # Hung (its Python stuck, its heartbeat beating) after step 33: the launcher's watchdog kills it.
    # Weights changed silently after step 16: the next quorum's check heals them from the peer (a quorum
    # every step, so that no gradient of the changed weights reaches the sum).
    run = _start(_train_args(data, out, "--workers", "2", *EPOCHS, *LIVE, "--debug-step-delay", "0.1",
                             "--debug-fault", "hang:1:33", "--debug-corrupt-at", "1:16", "--quorum-every", "1"),
                 tmp_path)
    wait_for(lambda: _steps_done(out) >= 5, 120, "training to make progress")
    # Frozen (SIGSTOP): the other replica trains on alone, its heartbeat moving while the frozen one
    # cannot answer; woken, the frozen one heals from it and rejoins.
    frozen = _workers(out)["replica1"]
    os.kill(frozen, signal.SIGSTOP)
    step = _steps_done(out)
    wait_for(lambda: _steps_done(out) >= step + 3, 30, "the other replica to train on")
    os.kill(frozen, signal.SIGCONT)
    # Killed (SIGKILL) mid-epoch 2 (15-step epochs): respawned, it heals from the live peer.
    wait_for(lambda: _steps_done(out) >= 20, 120, "training to go on")
    before = _workers(out)
    os.kill(before["replica0"], signal.SIGKILL)
    wait_for(lambda: (out / "debug-fault-0").exists(), 120, "a worker to hang")
    hung = _workers(out)
    output = _finish(run)
    after = _workers(out)
    assert hung["replica1"] == frozen and hung["replica0"] != before["replica0"], (before, hung)
    assert "has been on one step for" in output, output[-2000:]
    assert (out / "debug-corrupted").exists() and "this replica's weights differed" in output, output[-2000:]
    assert sum(after[name] != hung[name] for name in hung) == 1, (hung, after)  # the hung one, respawned
    summary = json.loads((out / "summary.json").read_text())
    # A step with the dead (or frozen) peer was discarded and redone: the audit below holds across it.
    assert summary["restarts"] == 0 and summary["discarded_steps"] >= 3, summary  # freeze, kill, hang
    changes = _changes(out)
    assert any(e["new_participants"] == 1 for e in changes if e["step"] < 20), changes  # the freeze
    # The kill costs the survivor about the heartbeat timeout (0.5 s here; a margin for a loaded machine);
    # the freeze and the hang, the collective timeout (4 s) or the watchdog's bound (5 s), plus as much.
    # The kill's change is to one participant, or straight to the respawn where it joined within the
    # heartbeat timeout (2 -> 2).
    killed = [e for e in changes if 20 <= e["step"] < 33]
    assert killed and all(e["stall_seconds"] < 3 for e in killed), changes
    assert all(e["stall_seconds"] < 10 for e in changes), changes
    assert "workers 2 ->" in output
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3]
    assert_each_epoch_covered_once(out, 3)
    assert_same_weights(out, reference)


def test_nodes_join_and_leave_a_running_job_through_torchrun(data: Path, tmp_path: Path):
    """Three torchrun agents, one replica each, around one Lighthouse: the second and third join the
    first's running job, the second's agent is killed and the job goes on, then the other two leave
    on SIGTERM with a checkpoint."""
    port, out = free_port(), tmp_path / "run"
    lighthouse = _lighthouse(port)
    secret = _secret_file(tmp_path)
    # More epochs than the test waits for: the job runs until the test stops it.
    args = _train_args(data, out, "--epochs", "100", *EPOCHS[2:], *LIVE, "--lighthouse", f"127.0.0.1:{port}",
                       "--secret-file", str(secret), "--debug-step-delay", "0.1")
    try:
        first = _torchrun_node(args, tmp_path)
        wait_for(lambda: _steps_done(out) >= 2, 120, "the first node to train")
        second, third = _torchrun_node(args, tmp_path), _torchrun_node(args, tmp_path)
        wait_for(lambda: any(e["new_participants"] == 3 for e in _changes(out)), 120, "both nodes to join")
        second.kill()  # its agent, hard; the agent's worker follows it
        second.wait()
        wait_for(lambda: _changes(out)[-1]["new_participants"] == 2, 60, "the job to go on without it")
        for node in (first, third):  # SIGTERM: each worker leaves after a committed step
            for worker in local_worker_pids(node.pid).values():
                os.kill(worker, signal.SIGTERM)
        _finish(first)
        _finish(third)
    finally:
        lighthouse.kill()
    counts = [(e["old_participants"], e["new_participants"]) for e in _changes(out)]
    joined = next(i for i, (_, new) in enumerate(counts) if new == 3)
    assert counts[0][0] == 1 and (3, 2) in counts[joined:], counts
    assert list_training_checkpoints(out) and not (out / "summary.json").exists()
    records = read_metrics(out)
    assert len(records) >= 1
    assert_each_epoch_covered_once(out, len(records))
    # Trained through joins and a death: the undisturbed run reaches 1.0 on these data in 2 epochs.
    assert records[-1]["test_accuracy"] >= 0.9, records


def test_a_restarted_lighthouse_is_joined_again_and_a_lost_one_stops_the_job_resumably(
        data: Path, reference: Path, tmp_path: Path):
    port, out = free_port(), tmp_path / "run"
    lighthouse = _lighthouse(port)
    node = _start(_train_args(data, out, *EPOCHS, *LIVE, "--lighthouse", f"127.0.0.1:{port}", "--quorum-every", "2",
                              "--secret-file", str(_secret_file(tmp_path)), "--debug-step-delay", "0.1",
                              "--lighthouse-grace", "6"), tmp_path)
    try:
        wait_for(lambda: _steps_done(out) >= 8, 120, "training to make progress")
        # Away while a new one starts (within the grace): the job waits at its next quorum and goes on with
        # the new one. torchft_lighthouse imports torch before it listens: 3.5 s seen on a loaded 2-core
        # machine.
        lighthouse.kill()
        lighthouse.wait()
        lighthouse = _lighthouse(port)
        step = _steps_done(out)
        wait_for(lambda: _steps_done(out) >= step + 6, 60, "training to go on with the restarted Lighthouse")
    finally:
        lighthouse.kill()  # now for good: the job stops resumably once the grace is over
    started = time.monotonic()
    output = node.communicate(timeout=120)[0]
    assert node.returncode == 2, output[-3000:]
    assert "lost the torchft Lighthouse" in output and "Traceback" not in output, output[-3000:]
    assert 6 <= time.monotonic() - started < 30
    # Resumable by either path: here a live job of two workers (the default), under a Lighthouse of its
    # own (the folder's, gone, is taken over).
    resumed = run_cli(_train_args(data, out, "--workers", "2", *EPOCHS, "--resume"), tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_each_epoch_covered_once(out, 3)
    assert_same_weights(out, reference)


def test_a_nan_and_a_stop_in_the_same_live_round_is_a_divergence_not_a_checkpoint(data: Path, tmp_path: Path):
    """One stop precedence for both modes: a diverged replica is never saved as a resumable stop."""
    out = tmp_path / "run"
    result = run_cli(_train_args(data, out, "--workers", "2", *EPOCHS, *LIVE, "--debug-nan-at", "1:3",
                                 "--debug-stop-at-step", "4"), tmp_path / "cache")
    # Both land in the round that trains step 3: the stop is asked for at the exchange ending it (4 steps done).
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["recovery"], summary["stop_reason"], summary["stop_step"]) == ("live", "diverged", 4)
    assert all(len(summary[key]) == 2 for key in ("compute_seconds", "communication_seconds"))




def test_a_hung_node_under_torchrun_ends_itself_and_torchrun_restarts_it(data: Path, reference: Path,
                                                                         tmp_path: Path):
    """Under torchrun no launcher watches the replicas: a node whose Python hangs with its heartbeat
    alive ends itself past its bound (its own watchdog thread), its torchrun restarts it, and it heals
    from the other node; the job ends with the undisturbed run's weights."""
    port, out = free_port(), tmp_path / "run"
    lighthouse = _lighthouse(port)
    args = _train_args(data, out, *EPOCHS, *LIVE, "--lighthouse", f"127.0.0.1:{port}",
                       "--secret-file", str(_secret_file(tmp_path)), "--debug-step-delay", "0.1",
                       "--debug-fault", "hang:1:12")
    prefix = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "--max-restarts", "1",
              "-m", "distvision"]
    try:
        nodes = [_start(args, tmp_path, prefix=prefix) for _ in range(2)]
        outputs = [_finish(node, timeout=180) for node in nodes]
    finally:
        lighthouse.kill()
    assert (out / "debug-fault-0").exists()
    assert any("exiting, to be restarted" in output for output in outputs), outputs[0][-2000:]
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3]
    assert_each_epoch_covered_once(out, 3)
    assert_same_weights(out, reference)
