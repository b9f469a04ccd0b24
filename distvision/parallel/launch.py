"""Start local workers through torch's elastic launcher (the API torchrun itself uses).

`distvision train --workers N` on one machine and
`torchrun --nnodes=... --nproc-per-node=... -m distvision train ...` on many run the same
worker function; only who starts it differs.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import runpy
import signal
import socket
import sys
import uuid
from collections.abc import Callable

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

# Exit status a worker uses for a UserError, so the launcher can tell it from a crash.
USER_ERROR_EXIT = 2

# Since torch 2.5 the c10d rendezvous shares the rank-0 agent's TCPStore with the workers. That store
# outlives each worker group, and with it torch 2.13 breaks both elastic paths:
# - a regrouped worker can read the gloo address its dead predecessor left under the same key and
#   wait in init_process_group until it times out (pytorch/pytorch#135712; one restart in three here);
# - the rank-0 agent publishes MASTER_ADDR/MASTER_PORT only in its first round's key space
#   (DynamicRendezvousHandler.next_rendezvous caches _bootstrap_store_info), so a node that joins a
#   running job waits for them in the new round while rank 0 waits for the newcomer's role_info.
# With sharing off, every round's rank-0 worker hosts a fresh store on a fresh port.
PRIVATE_STORE_VARIABLE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def started_by_torchrun() -> bool:
    """True inside a worker that torchrun (or our launcher) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PR_SET_PDEATHSIG = 1


def stop_when_parent_dies(parent: int | None = None) -> None:
    """Get SIGTERM (a resumable stop) when the process that started this one dies.

    torch's agent starts each worker in a session of its own, so a worker whose agent is killed
    would otherwise run on as an orphan, holding its run folder and its collectives. `parent`, the
    pid that started us where known, catches a parent that died before the request took effect.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: orphans stop at their next collective timeout instead
        return
    if os.getppid() != (parent or os.getppid()) or os.getppid() == 1:  # already orphaned
        os.kill(os.getpid(), signal.SIGTERM)


FOLLOW_PARENT_VARIABLE = "DISTVISION_STOP_WITH_PARENT"
_stop_signal: list[int] = []  # the signal that stopped this process's work, once one has (note_stop_signal)


def note_stop_signal(number: int) -> None:
    """A stop signal arrived (training's StopSignal): the work ends early, at a step boundary."""
    _stop_signal[:] = [number]


def stop_signal_received() -> int | None:
    """The signal that stopped this process's work, or None."""
    return _stop_signal[0] if _stop_signal else None


FORKED_VARIABLE = "DISTVISION_FORKED_WORKER"  # "1": a local worker forked by launch_local (returns, not exits)
# What the local workers' forkserver imports once, so that no worker pays for it: torch, and torch._dynamo,
# which torch's optimizers import on their first use (about 2 s of a worker's start-up here).
WARM_MODULES = ["torch", "torch._dynamo", "distvision.cli"]


@record
def run_as_worker(work: Callable, config) -> None:
    """Run one worker's part of a job (work(config)): the entry point of every distvision worker.

    It stops with its agent; a UserError is printed once, by rank 0, and ends the worker with
    status 2; anything else reaches @record, which hands the traceback to the agent.
    """
    from distvision.errors import UserError

    stop_when_parent_dies()
    warn_if_store_is_shared()
    try:
        work(config)
    except UserError as error:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"distvision: error: {error}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
    # The work is done, its outputs written and its process group destroyed. Leave without the
    # interpreter's finalization: with a private rendezvous store (above) a worker whose peer (the
    # store's host) has already gone sometimes aborted there ("terminate called without an active
    # exception", exit -6) and turned a finished run into a failed one. A forked worker that finished
    # returns to the agent's wrapper instead, which hands back its result and leaves through os._exit
    # itself once every worker has; one stopped by a signal leaves now, as its agent is shutting down
    # and would wait for it, then kill it.
    sys.stdout.flush()
    sys.stderr.flush()
    if os.environ.get(FORKED_VARIABLE) != "1" or stop_signal_received() is not None:
        os._exit(0)


def warn_if_store_is_shared() -> None:
    """Rank 0 of a first attempt warns when torchrun shares its rendezvous store with the workers."""
    first_start = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and os.environ.get("RANK") == "0" and first_start:
        print(f"distvision: warning: with torch's shared rendezvous store, a worker group restarted after "
              f"a failure can hang and a node that joins later deadlocks; start torchrun with "
              f"{PRIVATE_STORE_VARIABLE}=1 (see the README)", file=sys.stderr, flush=True)


def start_workers(command: str, work: Callable, config, prepare: Callable[[], list[str]], *, workers: int,
                  max_restarts: int, join_timeout: float, stopped_hint: str, failed_hint: str | None = None) -> None:
    """The start-up of every distributed command (train, classify): one way for both.

    Under torchrun this process is one worker: it runs work(config). Otherwise prepare() checks
    what can fail before any worker starts and returns the workers' arguments, and `workers` local
    workers run `distvision <command> <those arguments>`. A signal that stops them exits with
    128 + the signal, saying `stopped_hint` (how to continue); failed_hint is added to a failure.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException

    if started_by_torchrun():
        run_as_worker(work, config)
        return
    worker_args = prepare()
    try:
        launch_local([command, *worker_args], workers, max_restarts=max_restarts, join_timeout=join_timeout)
    except SignalException as stop:
        print(f"distvision: stopped by signal {stop.sigval}; {stopped_hint}", file=sys.stderr)
        sys.exit(128 + int(stop.sigval))
    except WorkerFailed as failure:
        if failed_hint is None:
            raise
        raise WorkerFailed(f"{failure}; {failed_hint}") from None


def forked_worker(command_args: list[str]) -> None:
    """One local worker: `python -m distvision <command_args>`, forked from a forkserver that has imported
    torch already (launch_local), so it runs the very code a worker torchrun starts runs."""
    os.environ[FORKED_VARIABLE] = "1"
    sys.stdout.reconfigure(line_buffering=True)  # as `python -u`: the lines reach the user as they come
    sys.argv = ["distvision", *command_args]
    runpy.run_module("distvision", run_name="__main__", alter_sys=True)


def launch_local(command_args: list[str], workers: int, max_restarts: int = 0,
                 join_timeout: float = 600.0) -> None:
    """Run `python -m distvision <command_args>` as `workers` local worker processes, as torchrun does.

    torch's elastic agent (torchrun's) starts them, and restarts the whole group when one dies (up to
    max_restarts times); the workers resume from their own checkpoint. Each runs the command line a
    torchrun worker runs, in a process forked from a forkserver that has imported torch and the command
    once (WARM_MODULES): a worker, and each restart, starts in a fraction of a second instead of the
    seconds a fresh Python and torch take (benchmarks/RESULTS.md, 2026-12-03).
    """
    multiprocessing.set_forkserver_preload([*WARM_MODULES, f"distvision.commands.{command_args[0].replace('-', '_')}"])
    # The elastic agent logs every phase at INFO/WARNING; users need only failures.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    os.environ[PRIVATE_STORE_VARIABLE] = "1"  # read by the agent this process runs
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=workers,
        run_id=f"distvision-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        # Loopback only: the c10d store is unauthenticated (see the README).
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        local_addr="127.0.0.1",  # the workers' MASTER_ADDR (else this host's FQDN)
        rdzv_configs={"join_timeout": join_timeout},
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="forkserver",
    )
    try:
        elastic_launch(config, forked_worker)(command_args)
    except ChildFailedError as error:
        codes = {failure.exitcode for failure in error.failures.values()}
        if codes == {USER_ERROR_EXIT}:
            raise SystemExit(USER_ERROR_EXIT) from None  # the worker already printed the one-line error
        first = next(iter(error.failures.values()))
        raise WorkerFailed(f"a worker failed (exit code {first.exitcode}); see its error above") from None


class WorkerFailed(Exception):
    """A worker process crashed (not a user error)."""
