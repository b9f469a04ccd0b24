"""A `distvision train` run as a child process: the one way tune, train-each, scale and bench start one.

The child is started exactly as a user would start it (`python -m distvision train FLAGS`, the
flags from TrainConfig.to_argv), so it runs the local elastic launcher and real worker processes.
It writes everything it prints to a log file, stops resumably (SIGTERM) if its parent dies, and
may be pinned to a share of the cores and, on a CUDA machine, given GPUs of its own (CUDA_VISIBLE_DEVICES,
so that parallel children do not all land on GPU 0); a non-zero exit status becomes a TrainingFailed
that carries the status and the log's last line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from distvision.config import TrainConfig
from distvision.parallel.launch import FOLLOW_PARENT_VARIABLE

STOP_WAIT_SECONDS = 60.0  # after SIGTERM: time the child gets to checkpoint and stop before it is killed
GPU_VARIABLE = "CUDA_VISIBLE_DEVICES"


class TrainingFailed(Exception):
    """A training child ended with a non-zero exit status."""

    def __init__(self, status: int, last_line: str, log_path: Path):
        super().__init__(f"training exited with status {status}: {last_line}")
        self.status, self.last_line, self.log_path = status, last_line, log_path


@dataclass
class TrainingChild:
    """A running `distvision train` child and its log."""

    process: subprocess.Popen
    command: list[str]
    log_path: Path

    def poll(self) -> int | None:
        return self.process.poll()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the end; past the timeout the child is killed and subprocess.TimeoutExpired raised."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def stop(self, grace_seconds: float = STOP_WAIT_SECONDS) -> None:
        """SIGTERM (train checkpoints and exits at its next step), SIGKILL if it has not stopped in time."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace_seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def last_log_line(self, default: str = "") -> str:
        """The log's last non-empty line: a failed run's one-line error."""
        lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1].rstrip() if lines else default

    def check(self) -> None:
        """Raise TrainingFailed unless the child has ended with status 0."""
        if self.returncode != 0:
            raise TrainingFailed(self.returncode, self.last_log_line(), self.log_path)


def training_command(config: TrainConfig) -> list[str]:
    """The command line that runs `distvision train` with these settings."""
    return [sys.executable, "-m", "distvision", "train", *config.to_argv()]


def start_training(config: TrainConfig, log_path: Path, cores: list[int] | None = None,
                   append_log: bool = True, gpus: Sequence[int] = ()) -> TrainingChild:
    """Start `distvision train` with these settings, its output into log_path, on `cores` and `gpus` if given
    (GPU indices as this process sees them, from gpu_share; ignored under --device cpu).

    No preexec_fn (unsafe in a process with threads): the affinity is set right after the start,
    long before the child counts its cores, and the child asks for SIGTERM on our death itself
    (distvision's main() reads FOLLOW_PARENT_VARIABLE).
    """
    command = training_command(config)
    env = child_environment(os.environ, gpus if config.device != "cpu" else ())
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab" if append_log else "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if cores is not None:
        try:
            os.sched_setaffinity(process.pid, cores)
        except ProcessLookupError:  # it already ended; its exit status says why
            pass
    return TrainingChild(process, command, log_path)


def run_training(config: TrainConfig, log_path: Path, cores: list[int] | None = None,
                 timeout: float | None = None, append_log: bool = True, gpus: Sequence[int] = ()) -> None:
    """Run `distvision train` with these settings to its end; TrainingFailed if it fails."""
    child = start_training(config, log_path, cores, append_log, gpus)
    child.wait(timeout)
    child.check()


def core_share(cores: list[int], slot: int, slots: int) -> list[int]:
    """Slot `slot` of `slots`' share of these cores (a whole core at least, shared when too few)."""
    share = cores[slot * len(cores) // slots:(slot + 1) * len(cores) // slots]
    return share or [cores[slot % len(cores)]]


def gpu_share(child: int, device_count: int, gpus_per_child: int) -> list[int]:
    """GPUs for child number `child` (0, 1, ...): gpus_per_child of the device_count, round robin; none
    without GPUs. A child that needs more GPUs than there are gets all of them."""
    if device_count <= 0:
        return []
    per_child = max(1, min(gpus_per_child, device_count))
    return [(child * per_child + k) % device_count for k in range(per_child)]


def local_gpu_count() -> int:
    """The CUDA devices this process sees (0 on a machine without CUDA)."""
    import torch

    return torch.cuda.device_count()


def child_environment(parent: Mapping[str, str], gpus: Sequence[int] = ()) -> dict[str, str]:
    """A training child's environment: the parent's, unbuffered, told to follow the parent, and limited
    to `gpus` (indices among the devices the parent sees) when any are given."""
    env = dict(parent, PYTHONUNBUFFERED="1", **{FOLLOW_PARENT_VARIABLE: str(os.getpid())})
    if gpus:
        # Indices count the parent's visible devices: under CUDA_VISIBLE_DEVICES=4,5 (a scheduler's
        # choice), index 1 is device 5.
        visible = parent.get(GPU_VARIABLE)
        names = [name.strip() for name in visible.split(",")] if visible else [str(i) for i in range(max(gpus) + 1)]
        env[GPU_VARIABLE] = ",".join(names[i] for i in gpus)
    return env
