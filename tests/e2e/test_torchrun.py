"""Several machines are just torchrun: two launcher agents (two "nodes") rendezvous and train together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, free_port, write_image_tree


def test_two_torchrun_nodes_train_one_model(tmp_path: Path):
    data = write_image_tree(tmp_path / "data", classes=2, train_per_class=16, test_per_class=4)
    endpoint = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=nodes-test",
        "-m", "distvision", "train", "--data", str(data), "--model", "mlp", "--epochs", "2",
        "--batch-size", "8", "--precision", "fp32", "--out", str(tmp_path / "run"),
    ]
    nodes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2
