"""What the live-membership tests share: quick failure-detection flags, starting and finishing a job,
reading its folder, and a torchft Lighthouse of their own (tests/e2e/test_live*.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from distvision.metrics import read_events
from distvision.parallel.healing import new_secret
from tests.helpers import ELASTIC_REFERENCE, REPO, elastic_train_args

# Quick failure detection for tests: a peer silent for 0.5 s is left out of the next quorum, and a
# collective waits at most 4 s for a frozen one.
LIVE = ["--recovery", "live", "--heartbeat-timeout", "0.5", "--collective-timeout", "4"]
EPOCHS = ELASTIC_REFERENCE


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


def _changes(out: Path) -> list[dict]:
    return [event for event in read_events(out) if event["event"] == "membership"]


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
