"""Live membership (`--recovery live`, torchft) with real processes: a killed worker, a frozen one, a node
that joins a running job and one that leaves it, a lost Lighthouse. The survivors never restart, every
sample is still trained once per epoch, and the run ends with the weights of the restart path's
undisturbed run (the same arithmetic, whoever took part in each step)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distvision.checkpoint import list_training_checkpoints
from distvision.metrics import read_events, read_metrics
from distvision.parallel.healing import new_secret
from distvision.procfs import local_worker_pids
from tests.helpers import (
    ELASTIC_REFERENCE,
    REPO,
    assert_each_epoch_covered_once,
    elastic_train_args,
    free_port,
    run_cli,
    wait_for,
)

# Quick failure detection for tests: a peer silent for 0.5 s is left out of the next quorum, and a
# collective waits at most 4 s for a frozen one.
LIVE = ["--recovery", "live", "--heartbeat-timeout", "0.5", "--collective-timeout", "4"]
EPOCHS = ELASTIC_REFERENCE


@pytest.fixture(scope="module")
def data(elastic_data: Path) -> Path:
    return elastic_data


@pytest.fixture(scope="module")
def reference(undisturbed_run: Path) -> Path:
    """An undisturbed 2-worker run on the restart path (DDP): the weights every live run must end with."""
    return undisturbed_run


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return elastic_train_args(data, out, *extra)


def _start(args: list[str], tmp_path: Path, prefix: list[str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *(prefix or ["-m", "distvision"]), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(process: subprocess.Popen, timeout: float = 120) -> str:
    try:
        output = process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0]
        raise AssertionError(f"still running after {timeout} s:\n{output[-3000:]}") from None
    assert process.returncode == 0, output[-3000:]
    return output


def _workers(out: Path) -> dict[str, int]:
    try:
        return json.loads((out / "workers.json").read_text())
    except (OSError, ValueError):
        return {}


def _steps_done(out: Path) -> int:
    try:
        return json.loads((out / "heartbeat.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def _assert_same_weights(out: Path, reference: Path) -> None:
    expected = load_file(reference / "checkpoint" / "model.safetensors")
    actual = load_file(out / "checkpoint" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-5)


def _changes(out: Path) -> list[dict]:
    return [event for event in read_events(out) if event["event"] == "membership"]


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
    killed = [e for e in changes if 20 <= e["step"] < 33 and e["new_participants"] == 1]
    assert killed and all(e["stall_seconds"] < 3 for e in killed), changes
    assert all(e["stall_seconds"] < 10 for e in changes), changes
    assert "workers 2 ->" in output
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3]
    assert_each_epoch_covered_once(out, 3)
    _assert_same_weights(out, reference)


def _lighthouse(port: int) -> subprocess.Popen:
    """torchft's own Lighthouse binary, as a multi-machine job runs it (docs/fault-tolerance.md)."""
    binary = Path(sys.executable).parent / "torchft_lighthouse"
    return subprocess.Popen([str(binary), "--bind", f"127.0.0.1:{port}", "--min_replicas", "1",
                             "--heartbeat_timeout_ms", "500"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _secret_file(tmp_path: Path) -> Path:
    """The job's shared secret, which authenticates healing between nodes (readable by its owner only)."""
    secret = tmp_path / "secret"
    secret.write_text(new_secret())
    secret.chmod(0o600)
    return secret


def _torchrun_node(args: list[str], tmp_path: Path) -> subprocess.Popen:
    """One node of a multi-machine live job: torchrun with its own rendezvous, one worker."""
    return _start(args, tmp_path, prefix=["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                                          "-m", "distvision"])


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
                              "--lighthouse-grace", "4"), tmp_path)
    try:
        wait_for(lambda: _steps_done(out) >= 8, 120, "training to make progress")
        # Away for 1.5 s (within the grace): the job waits at its next quorum and goes on with the new one.
        lighthouse.kill()
        lighthouse.wait()
        time.sleep(1.5)
        lighthouse = _lighthouse(port)
        step = _steps_done(out)
        wait_for(lambda: _steps_done(out) >= step + 6, 60, "training to go on with the restarted Lighthouse")
    finally:
        lighthouse.kill()  # now for good: the job stops resumably once the grace is over
    started = time.monotonic()
    output = node.communicate(timeout=120)[0]
    assert node.returncode == 2, output[-3000:]
    assert "lost the torchft Lighthouse" in output and "Traceback" not in output, output[-3000:]
    assert 4 <= time.monotonic() - started < 30
    # Resumable by either path: here a live job of two workers (the default), under a Lighthouse of its
    # own (the folder's, gone, is taken over).
    resumed = run_cli(_train_args(data, out, "--workers", "2", *EPOCHS, "--resume"), tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_each_epoch_covered_once(out, 3)
    _assert_same_weights(out, reference)



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


def test_three_replicas_survive_faults_at_every_phase(data: Path, reference: Path, tmp_path: Path):
    """Phase-exact faults with 3 replicas, one of each kind: a kill while serving a heal (the newcomer's
    heal fails, it is respawned), a kill while the round's all-reduce is in flight (the round may commit
    on one survivor and fail on another: the committed sum holds every share, and the one that failed
    heals from it), a replica that leaves on its own SIGTERM (respawned), one frozen for 3 s, a kill in
    the middle of an epoch's split evaluation, and a Lighthouse restart (the command's own, at the same
    address). Every sample is still trained once per epoch, and the run ends with the undisturbed run's
    weights."""
    out = tmp_path / "run"
    # Ranks 0 and 1 only: there are nearly always two participants, while a third may be a respawn that
    # is not back yet when its fault's phase comes.
    faults = ["kill:0:0:heal", "kill:1:8:exchange", "term:1:12", "stop:0:20", "kill:1:25:eval", "lighthouse:0:16"]
    output = _finish(_start(_train_args(data, out, "--workers", "3", *EPOCHS, *LIVE, "--debug-step-delay", "0.05",
                                        *[arg for fault in faults for arg in ("--debug-fault", fault)]), tmp_path))
    for number, fault in enumerate(faults[:-1]):  # the Lighthouse's is the command's: it leaves no marker
        kind, _, _, *phase = fault.split(":")
        assert (out / f"debug-fault-{number}").exists(), (fault, output[-3000:])
        assert f"debug fault: {kind} in the {(phase or ['step'])[0]} phase" in output, output[-3000:]
    assert "debug fault: restarting the Lighthouse" in output, output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restarts"] == 0, summary
    # never a wait for the collective timeout (4 s) twice; the freeze costs its 3 s
    changes = _changes(out)
    assert len(changes) >= 4 and all(e["stall_seconds"] < 8 for e in changes), changes
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3]
    assert output.count("distvision: test accuracy") == 1, output[-3000:]  # one summary, one writer
    assert_each_epoch_covered_once(out, 3)
    _assert_same_weights(out, reference)


def test_workers_stop_resumably_when_their_command_is_killed(data: Path, tmp_path: Path):
    """SIGKILL to the command alone: its workers (children of the forkserver, not of the command) must
    not train on without it and its run-folder lock; each stops as on SIGTERM, with a checkpoint."""
    out = tmp_path / "run"
    run = _start(_train_args(data, out, "--workers", "2", "--epochs", "100", *EPOCHS[2:], *LIVE,
                             "--debug-step-delay", "0.1"), tmp_path)
    try:
        wait_for(lambda: _steps_done(out) >= 5, 120, "training to make progress")
        workers = list(_workers(out).values())
        os.kill(run.pid, signal.SIGKILL)
        run.wait()

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie: exited

        wait_for(lambda: all(gone(pid) for pid in workers), 30, "the workers to stop")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    assert list_training_checkpoints(out)


@pytest.mark.parametrize("sync", [["--sync", "local-sgd", "--sync-every", "4"],
                                  ["--sync", "diloco", "--sync-every", "4"]], ids=["local-sgd", "diloco"])
def test_kills_under_local_steps_roll_the_period_back(data: Path, tmp_path: Path, sync: list[str]):
    """A kill in the middle of a period of local steps, and one while the period's average is in
    flight: the round (weights, optimizer and DiLoCo's outer state) is rolled back and redone by the
    survivors, every sample once per epoch, and the run learns as an undisturbed one does."""
    out = tmp_path / "run"
    # without the record recipe's tricks: DiLoCo's outer momentum diverges with them even undisturbed
    _finish(_start(_train_args(data, out, "--workers", "2", *EPOCHS[:4], *LIVE, *sync, "--debug-step-delay", "0.05",
                               "--debug-fault", "kill:1:6", "--debug-fault", "kill:1:34:exchange"), tmp_path))
    summary = json.loads((out / "summary.json").read_text())
    # the first kill discards its period (the one in flight may commit on the survivor first)
    assert summary["restarts"] == 0 and summary["discarded_steps"] >= 1, summary
    assert (out / "debug-fault-0").exists() and (out / "debug-fault-1").exists()
    assert_each_epoch_covered_once(out, 3)
    assert summary["test_accuracy"] >= 0.9, summary  # the undisturbed run reaches 1.0 on these data


def test_respawns_with_no_live_peer_continue_from_the_newest_checkpoint(data: Path, reference: Path,
                                                                         tmp_path: Path):
    """Every worker killed at once: there is no peer to heal from, so the respawns read the newest
    checkpoint (the end of epoch 1) and train on from there, as a resume would."""
    out = tmp_path / "run"
    run = _start(_train_args(data, out, "--workers", "2", *EPOCHS, *LIVE, "--debug-step-delay", "0.1"), tmp_path)
    wait_for(lambda: _steps_done(out) >= 20, 120, "training past the first epoch's checkpoint")
    for pid in _workers(out).values():
        os.kill(pid, signal.SIGKILL)
    _finish(run)
    joins = [json.loads(line) for line in (out / "joins.jsonl").read_text().splitlines()]
    # the first read the checkpoint; the other read it too, or healed from the first
    assert len(joins) == 2 and not all(join["healed"] for join in joins), joins
    assert json.loads((out / "summary.json").read_text())["restarts"] == 0
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3]
    assert_each_epoch_covered_once(out, 3)
    _assert_same_weights(out, reference)


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
    _assert_same_weights(out, reference)
