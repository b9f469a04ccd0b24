"""Live membership under faults at exact phases (--debug-fault), with real processes: one of each kind
among 3 replicas, kills under local steps, every worker killed at once, the command itself killed.
Every sample is still trained once per epoch, and where the arithmetic allows, the run ends with the
weights of the restart path's undisturbed run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest

from distvision.checkpoint import list_training_checkpoints
from distvision.metrics import read_metrics
from tests.e2e.live_helpers import (
    EPOCHS,
    LIVE,
    _changes,
    _finish,
    _start,
    _steps_done,
    _train_args,
    _workers,
)
from tests.helpers import assert_each_epoch_covered_once, assert_same_weights, wait_for


@pytest.fixture(scope="module")
def data(elastic_data: Path) -> Path:
    return elastic_data


@pytest.fixture(scope="module")
def reference(undisturbed_run: Path) -> Path:
    """An undisturbed 2-worker run on the restart path (DDP): the weights every live run must end with."""
    return undisturbed_run


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
    # (on a loaded machine faults close together fall into one change of quorum: 3 -> 1 at once)
    assert len(changes) >= 2 and all(e["stall_seconds"] < 8 for e in changes), changes
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3]
    assert output.count("distvision: test accuracy") == 1, output[-3000:]  # one summary, one writer
    assert_each_epoch_covered_once(out, 3)
    assert_same_weights(out, reference)


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


# Streaming DiLoCo with its changes quantized and overlapped: the rollback also keeps the error feedback
# (a discarded round's residual is not kept) and the fragments' agreed weights, the respawn takes its
# peer's (and which fragment is next), and a kill while the codes are being gathered (during the
# round's last step, which runs while they are in flight) fails the round like a sum's.
# PowerSGD: one-step rounds whose hook's state (error feedback, warm Q, count of rounds) is rolled back
# with a discarded round, and whose count the respawn must take from its peer: with its own it would send
# whole gradients while the peer sends P and Q.
@pytest.mark.parametrize("sync", [["--sync", "local-sgd", "--sync-every", "4"],
                                  ["--sync", "diloco", "--sync-every", "4", "--fragments", "2", "--quantize", "int4",
                                   "--overlap", "1"],
                                  ["--compress", "powersgd", "--powersgd-rank", "1"]],
                         ids=["local-sgd", "streaming-diloco-int4", "powersgd"])
def test_kills_roll_the_round_back(data: Path, tmp_path: Path, sync: list[str]):
    """A kill in the middle of a round (a period of local steps), and one while the round's exchange is
    in flight: the round (weights, optimizer, DiLoCo's outer state, PowerSGD's) is rolled back and redone
    by the survivors, every sample once per epoch, and the run learns as an undisturbed one does."""
    out = tmp_path / "run"
    # without the record recipe's tricks: DiLoCo's outer momentum diverges with them even undisturbed
    output = _finish(_start(_train_args(data, out, "--workers", "2", *EPOCHS[:4], *LIVE, *sync, "--debug-step-delay",
                                        "0.05", "--debug-fault", "kill:1:6", "--debug-fault", "kill:1:34:exchange"),
                            tmp_path))
    summary = json.loads((out / "summary.json").read_text())
    # the first kill discards its period (the one in flight may commit on the survivor first)
    assert summary["restarts"] == 0 and summary["discarded_steps"] >= 1, summary
    assert (out / "debug-fault-0").exists() and (out / "debug-fault-1").exists()
    assert "weights differed" not in output  # the respawn healed to its peer's state
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
    assert_same_weights(out, reference)
