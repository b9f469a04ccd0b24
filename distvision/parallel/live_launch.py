"""`--recovery live` on one machine: a Lighthouse, N replica processes, and a supervisor that respawns.

The command starts a torchft Lighthouse on loopback in a process of its own and one worker process per
replica; every server of the job listens on loopback only, and the workers heal from each other with
a secret made for the job (DISTVISION_SECRET in their environment). A worker that dies is respawned
(up to --max-restarts times per worker) into the running job, where it heals from a live peer; the
others never stop. Workers are forked from a forkserver that has already imported torch, torchft and
distvision, so a respawned worker reaches its first quorum in about its healing time instead of the
seconds an interpreter and torch's import take.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path

from distvision.fileio import write_json_atomic
from distvision.parallel import watchdog
from distvision.parallel.healing import SECRET_VARIABLE, new_secret
from distvision.parallel.launch import USER_ERROR_EXIT, WorkerFailed
from distvision.parallel.live import (
    ATTEMPT_VARIABLE,
    FIRST_WORKERS_VARIABLE,
    JOINING_VARIABLE,
    LIGHTHOUSE_ADDRESS_VARIABLE,
    REPLICA_VARIABLE,
    SPAWNED_AT_VARIABLE,
    STARTED_AT_VARIABLE,
    start_lighthouse,
)

LAUNCHER_VARIABLE = "DISTVISION_LAUNCHER_PID"  # the command's pid, in its workers' environment
LIGHTHOUSE_START_SECONDS = 30.0
LIGHTHOUSE_AFTERLIFE_SECONDS = 25.0  # a worker's stop takes at most 20 s (training/faults.STOP_GRACE_SECONDS)
# How long a quorum waits for a replica that heartbeats but has not asked to join. Replicas ask at the
# same moments (after the same committed round, after the same evaluation), so a few seconds is
# generous; a replica that committed a round its peers discarded (a peer died as the all-reduce
# ended) goes on with the old group and asks only when that fails: its peers' new quorum, formed
# without it after this wait, closes the old group's connections, its all-reduce fails at once, and
# it joins. With the rendezvous timeout here (600 s), that cost up to --collective-timeout instead.
LIGHTHOUSE_JOIN_SECONDS = 3.0
LIGHTHOUSE_DOWN_SECONDS = 1.0  # --debug-fault lighthouse: how long the restarted Lighthouse is away
STOP_WAIT_SECONDS = 60.0  # after SIGTERM, the workers finish their round and write a checkpoint
LOOPBACK = "127.0.0.1"


class LiveStopped(Exception):
    """The user stopped the job (SIGINT/SIGTERM); the workers saved a checkpoint."""

    def __init__(self, signal_number: int):
        super().__init__(f"stopped by signal {signal_number}")
        self.signal_number = signal_number


def launch_live(work: Callable[[dict[str, str], object], None], workers: int, max_restarts: int, heartbeat_timeout: float,
                pid_file: Path, warm_modules: list[str],
                lighthouse_restarts: list[int] | None = None, current_step: Callable[[], int] | None = None) -> None:
    """Run `workers` replicas, each work(environment, progress) in a process of its own, around a loopback
    Lighthouse until they finish. `work` must be picklable (a module-level function or a partial of one).

    warm_modules are imported once by the forkserver the workers are forked from; pid_file lists the
    live workers' process ids (to stop or kill one by hand, as the tests do). `progress` is the shared
    array through which the replica shows the watchdog that it is not stuck (watchdog.watch_this_replica).
    lighthouse_restarts (--debug-fault lighthouse): restart the Lighthouse, at the same address, once
    current_step() (the run's heartbeat) reaches each of these steps. A worker that exits cleanly before
    the run's end (it left alone on a SIGTERM of its own) is respawned like a dead one.
    """
    pids: dict[int, int] = {}
    # Loopback only, here and in the workers (LiveReplica's bind_host): healing is signed with the job's
    # secret, but the Lighthouse, the Managers' gRPC and gloo are not authenticated, so anyone who can
    # reach them can join a quorum or kill a replica (the Lighthouse's POST /replica/<id>/kill).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch._dynamo", "torchft", *warm_modules])
    lighthouse = LighthouseProcess(context, f"{LOOPBACK}:0", heartbeat_timeout)
    lighthouse_address = lighthouse.address
    restarts_due = list(lighthouse_restarts or [])
    # LOCAL_WORLD_SIZE: each worker takes its share of the cores (parallel/worker.py), as under torchrun.
    base = {LIGHTHOUSE_ADDRESS_VARIABLE: lighthouse_address, SECRET_VARIABLE: new_secret(),
            LAUNCHER_VARIABLE: str(os.getpid()),
            ATTEMPT_VARIABLE: str(time.time_ns() // 1_000_000), "LOCAL_WORLD_SIZE": str(workers),
            STARTED_AT_VARIABLE: repr(time.time())}

    progress: dict[int, object] = {}  # per replica, what the watchdog reads (parallel/watchdog.py)
    cpu_waits = watchdog.CpuWaits()  # and how long each has waited for a CPU, which it does not count

    def spawn(number: int, joining: bool, first: bool = False):
        environment = dict(base, **{REPLICA_VARIABLE: str(number), JOINING_VARIABLE: "1" if joining else "0",
                                    SPAWNED_AT_VARIABLE: repr(time.time()),
                                    FIRST_WORKERS_VARIABLE: str(workers if first else 0)})
        progress[number] = context.Array("d", watchdog.SLOTS, lock=False)
        process = context.Process(target=work, args=(environment, progress[number]), name=f"replica{number}")
        process.start()
        pids[number] = process.pid
        write_json_atomic(pid_file, {f"replica{n}": pid for n, pid in sorted(pids.items())})
        return process

    running = {number: spawn(number, joining=False, first=True) for number in range(workers)}
    restarts, finished, stop = dict.fromkeys(running, 0), set(), Stop()
    try:
        while running:
            wait([process.sentinel for process in running.values()], timeout=0.5)
            if stop.signal_number:
                stop.forward(running.values())
            kill_stuck(running, progress, cpu_waits)
            if restarts_due and current_step() >= restarts_due[0]:
                restarts_due.pop(0)
                print("distvision: debug fault: restarting the Lighthouse", file=sys.stderr, flush=True)
                lighthouse.shutdown()
                time.sleep(LIGHTHOUSE_DOWN_SECONDS)
                lighthouse = LighthouseProcess(context, lighthouse.bind, heartbeat_timeout)
            for number, process in list(running.items()):
                if process.exitcode is None:
                    continue
                del running[number]
                if process.exitcode == 0 and (stop.signal_number or watchdog.run_ended(progress[number])):
                    finished.add(number)
                elif process.exitcode == USER_ERROR_EXIT:
                    stop.forward(running.values())
                    raise SystemExit(USER_ERROR_EXIT)  # the worker printed its one-line error
                elif stop.signal_number or finished:
                    continue  # stopping, or the job is done: nothing to rejoin
                elif restarts[number] < max_restarts:
                    restarts[number] += 1
                    running[number] = spawn(number, joining=bool(running))
                elif not running:
                    raise WorkerFailed(f"every worker died (the last with exit code {process.exitcode}, "
                                       f"after {restarts[number]} respawn(s)); see its error above")
        if stop.signal_number:
            raise LiveStopped(stop.signal_number)
    finally:
        stop.forward(running.values())
        lighthouse.shutdown()


class LighthouseProcess:
    """The job's torchft Lighthouse in a process of its own, so that it can be lost and restarted as a
    real one would be: a Lighthouse shut down inside this process would go on serving the connections
    it already has. It ignores the terminal's signals (the command stops it last, after the workers have
    checkpointed) and exits when the command does."""

    def __init__(self, context, bind: str, heartbeat_timeout: float):
        receiver, sender = context.Pipe(duplex=False)
        self.process = context.Process(target=serve_lighthouse, name="lighthouse", daemon=True,
                                       args=(bind, heartbeat_timeout, sender, os.getpid()))
        self.process.start()
        sender.close()
        if not receiver.poll(LIGHTHOUSE_START_SECONDS):
            self.shutdown()
            raise WorkerFailed(f"the torchft Lighthouse did not start on {bind} within {LIGHTHOUSE_START_SECONDS:.0f} s")
        port = receiver.recv().rsplit(":", 1)[1]
        # Its address() names the machine's hostname, which need not resolve to loopback.
        self.bind, self.address = f"{LOOPBACK}:{port}", f"http://{LOOPBACK}:{port}"

    def shutdown(self) -> None:
        self.process.kill()
        self.process.join()


def serve_lighthouse(bind: str, heartbeat_timeout: float, ready, parent: int) -> None:
    """The Lighthouse process: serve, say where, and live as long as the command."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)
    lighthouse = start_lighthouse(bind, heartbeat_timeout, LIGHTHOUSE_JOIN_SECONDS)
    ready.send(lighthouse.address())
    ready.close()
    while alive(parent):
        time.sleep(0.5)
    # The command was killed: its workers stop (stop_with_launcher), each after a committed round, with
    # a checkpoint; the one left alone needs a quorum for its last round.
    time.sleep(LIGHTHOUSE_AFTERLIFE_SECONDS)


def alive(pid: int) -> bool:
    """Whether the process lives. The forkserver, not the command, is the parent of what the command
    starts, and it outlives a command that was killed: its children ask after the command itself."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_with_launcher() -> None:
    """In a worker: a resumable stop (SIGTERM to itself) once the command that launched it is gone, so
    that a killed command leaves no workers training on without it (and without its run-folder lock)."""
    launcher = int(os.environ[LAUNCHER_VARIABLE])

    def follow() -> None:
        while alive(launcher):
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=follow, name="follow-launcher", daemon=True).start()


def kill_stuck(running: dict, progress: dict, cpu_waits: watchdog.CpuWaits) -> None:
    """The watchdog: SIGKILL a replica that has computed one step for longer than its bound (its Python
    stuck while torchft's heartbeat thread runs); the loop then respawns it like any dead replica."""
    now = time.time()
    for number, process in running.items():
        starved = cpu_waits.during_step(number, process.pid, progress[number][0])
        seconds = watchdog.overdue(progress[number], now, starved)
        if seconds is not None and process.exitcode is None:
            print(f"distvision: replica {number} has been on one step for {seconds:.0f} s (its bound: "
                  f"{progress[number][1]:.0f} s); killing it, to be respawned", file=sys.stderr, flush=True)
            progress[number][0] = 0.0
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)


class Stop:
    """SIGINT/SIGTERM to the command: every worker gets SIGTERM, finishes its round and checkpoints."""

    def __init__(self):
        self.signal_number = 0
        self._forwarded: set[int] = set()
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._handle)

    def _handle(self, number, frame):
        self.signal_number = number

    def forward(self, processes) -> None:
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        for process in processes:
            if process.pid not in self._forwarded and process.exitcode is None:
                self._forwarded.add(process.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                process.kill()


def stopped_exit(stop: LiveStopped, hint: str) -> None:
    print(f"distvision: stopped by signal {stop.signal_number}; {hint}", file=sys.stderr)
    sys.exit(128 + stop.signal_number)
