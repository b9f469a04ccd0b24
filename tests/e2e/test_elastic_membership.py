"""A node that starts later joins a running torchrun job, and the job goes on when it leaves again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from distvision.checkpoint import list_training_checkpoints
from distvision.metrics import read_events
from distvision.parallel.launch import PRIVATE_STORE_VARIABLE
from distvision.procfs import local_worker_pids
from tests.helpers import (
    REPO,
    assert_each_epoch_covered_once,
    free_port,
    restart_world_sizes,
    wait_for,
    write_image_tree,
)

EPOCHS = 5
# keep_alive_max_attempt must be 3 or more: a node's first heartbeat after a rendezvous comes about
# two keep-alive intervals after its last one in it, and a node whose heartbeat has expired once
# never sends another (torch 2.13), so a later node would find it dead and start a job of its own.
RENDEZVOUS_CONF = "join_timeout=60,last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=4"


def _node(data: Path, out: Path, tmp_path: Path, endpoint: str) -> subprocess.Popen:
    """One torchrun agent with one distvision worker, in an elastic job of 1 to 2 nodes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1",
               "--max-restarts=3", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=membership",
               f"--rdzv-conf={RENDEZVOUS_CONF}", "--monitor-interval=0.2",
               "-m", "distvision", "train", "--data", str(data), "--out", str(out), "--model", "mlp",
               "--precision", "fp32", "--batch-size", "8", "--lr", "0.05", "--audit-samples", "--epochs", str(EPOCHS),
               "--debug-step-delay", "0.1", "--checkpoint-every", "0.5", "--collective-timeout", "8"]
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONUNBUFFERED="1",
               **{PRIVATE_STORE_VARIABLE: "1"})
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _newest_checkpoint_step(out: Path) -> int:
    checkpoints = list_training_checkpoints(out)
    return int(checkpoints[-1].name.split("-")[1]) if checkpoints else -1


def _signal_node(agent: subprocess.Popen, signal_number: int) -> None:
    """Signal a whole node: its worker (torchrun runs it in a session of its own) first, then its agent."""
    for pid in [*local_worker_pids(agent.pid).values(), agent.pid]:
        try:
            os.kill(pid, signal_number)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(300)
def test_a_late_node_joins_the_running_job_and_a_stopped_one_leaves_it(tmp_path: Path):
    """World size 1 -> 2 when a second node starts later, 2 -> 1 when that node is frozen (SIGSTOP, so the
    survivor's collective must time out rather than hang); the survivor finishes and no sample is lost."""
    data = write_image_tree(tmp_path / "data", classes=3, train_per_class=40, test_per_class=4)
    out, endpoint = tmp_path / "run", f"127.0.0.1:{free_port()}"
    first = _node(data, out, tmp_path, endpoint)
    second = None
    try:
        wait_for(lambda: (out / "heartbeat.json").exists(), 120, "the first node to train alone")
        second = _node(data, out, tmp_path, endpoint)
        wait_for(lambda: (1, 2) in restart_world_sizes(out), 90, "the second node to join (world size 1 -> 2)")
        joined_at = next(e["step"] for e in read_events(out) if e.get("new_world_size") == 2)
        # The join is on record once the two-node group has checkpointed (a restart goes back to a checkpoint).
        wait_for(lambda: _newest_checkpoint_step(out) > joined_at, 60, "the two nodes to train and checkpoint")
        _signal_node(second, signal.SIGSTOP)
        output = first.communicate(timeout=150)[0]
    finally:
        for node in (first, second):
            if node and node.poll() is None:
                _signal_node(node, signal.SIGKILL)
                node.communicate(timeout=30)
    assert first.returncode == 0, output[-3000:]
    assert restart_world_sizes(out)[-2:] == [(1, 2), (2, 1)], output[-3000:]
    assert_each_epoch_covered_once(out, EPOCHS)
