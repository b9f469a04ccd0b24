"""The command's first moment: before the command line is parsed (and torch imported), start the
forkserver that local workers are forked from, so that its imports run beside the command's own.

A `distvision train` or `classify` with several local workers forks them from a forkserver that has
imported torch and the command (parallel/launch.py, parallel/live_launch.py). Started when the launch
begins, its imports (about 4 s of CPU here) come after the command's own (2.4 s): on two free cores,
started first, they overlap. Only where the command line plainly asks for local workers; a guess
wrong the other way just starts it later, at the launch, as before.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from multiprocessing import forkserver

# What the workers of either launcher need (a superset of each one's list: one forkserver serves both).
WARM_MODULES = ["torch", "torch._dynamo", "torchft", "distvision.cli", "distvision.train"]
# Set in a process that is itself a worker (torchrun's, or a live replica of another machine's job).
WORKER_VARIABLES = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "DISTVISION_REPLICA")


def forks_local_workers(argv: list[str], environ) -> bool:
    """Whether this command line will launch several local workers from a forkserver."""
    if not argv or argv[0] not in ("train", "classify") or any(name in environ for name in WORKER_VARIABLES):
        return False
    if any(flag in argv for flag in ("-h", "--help", "--print-config", "--lighthouse")):
        return False
    for index, arg in enumerate(argv):
        workers = arg.split("=", 1)[1] if arg.startswith("--workers=") else (
            argv[index + 1] if arg == "--workers" and index + 1 < len(argv) else None)
        if workers is not None:
            return workers != "1"
    return True  # the default: 2 workers


def main() -> None:
    """The `distvision` command."""
    if forks_local_workers(sys.argv[1:], os.environ):
        # torchft reads RUST_LOG when first imported, here in the forkserver: quiet, as live.quiet_torchft
        # makes it wherever torchft is imported first (a user's RUST_LOG stands)
        os.environ.setdefault("RUST_LOG", "error")
        multiprocessing.set_forkserver_preload(
            [*WARM_MODULES, f"distvision.commands.{sys.argv[1].replace('-', '_')}"])
        forkserver.ensure_running()
    from distvision.cli import main as command_line

    command_line()
