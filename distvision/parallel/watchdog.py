"""The live launcher's progress watchdog: a replica stuck in its own computing is killed and respawned
(under torchrun, where no launcher watches, the replica's own thread ends it and torchrun restarts it).

torchft's heartbeat comes from a Rust thread, so a replica whose Python is stuck (a hang in a library,
a deadlock) still looks alive to the Lighthouse, and its peers wait for it in the all-reduce for the
whole --collective-timeout. Each replica therefore tells its launcher, through a small shared array,
since when it has been computing its current step (0 while it waits for peers, a quorum or heals, and
at an epoch's end) and how long a step may take: a few times the median of its recent steps. The launcher
kills a replica past that bound; its sockets close, so its peers' all-reduce fails at once and they go
on without it, and the launcher respawns it into the job, where it heals.

Waiting is never watched: a replica waiting in a collective is waiting for someone else, who is the
one watched. Evaluation is not watched either (its length is not a round's). Nor is the time a replica
spends waiting for a CPU (the kernel's run-queue wait, /proc/PID/schedstat): an overloaded machine
slows every replica's step at once, and killing them for it threw their work away (seen with a
training at low priority beside a busy one: both replicas killed, the run back to its checkpoint),
while a stuck replica, sleeping in a deadlock or spinning on a CPU it has, does not wait for one.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections import deque

STEPS = 5.0  # a step may last this many times the recent median ...
MIN_SECONDS = 5.0  # ... and never less than this (a loaded machine's steps vary)
FIRST_SECONDS = 120.0  # before any round has been timed: the first steps' warm-up, a lazy compile
WATCHDOG_EXIT = 5  # a replica that watches itself exits with this past its bound
# The shared array: [computing since (wall clock, 0 when not computing), bound in seconds, 1 once the
# replica has seen the run to its end (0: a clean exit before it, e.g. on a SIGTERM of its own, is a
# departure, and the launcher respawns it)]
SLOTS = 3

_shared = None  # this replica's array from its launcher (None: not watched, e.g. under torchrun)


def watch_this_replica(shared) -> None:
    """In a launched replica: report progress into `shared` (a multiprocessing Array of SLOTS doubles)."""
    global _shared
    _shared = shared


class ComputeClock:
    """This replica's side: the loop says when it starts computing, when a step is done, and when it
    waits. The bound is a few times the median step (data loading included).

    With watch_itself (a replica no launcher watches: one node's under torchrun), a thread of its own
    reads the clock instead, and ends the process past its bound; torchrun's agent restarts it
    (--max-restarts) and it heals from a live peer. A thread cannot see a hang that holds the GIL, as
    the launcher can; a hang in Python or in a call that releases it, it can."""

    def __init__(self, watch_itself: bool = False):
        self.shared = _shared
        self.since = 0.0
        self.durations: deque[float] = deque(maxlen=64)
        if watch_itself and self.shared is None:
            self.shared = [0.0, FIRST_SECONDS, 0.0]
            threading.Thread(target=self._watch, name="progress-watchdog", daemon=True).start()

    def _watch(self) -> None:
        waits = CpuWaits()
        while True:
            time.sleep(1.0)
            since = self.shared[0]
            seconds = overdue(self.shared, time.time(), waits.during_step(0, os.getpid(), since))
            if seconds is not None:
                print(f"distvision: this replica has been on one step for {seconds:.0f} s (its bound: "
                      f"{self.shared[1]:.0f} s); exiting, to be restarted", file=sys.stderr, flush=True)
                os._exit(WATCHDOG_EXIT)

    def computing(self) -> None:
        if not self.since:
            self._publish(time.time())

    def stepped(self) -> None:
        now = time.time()
        if self.since:
            self.durations.append(now - self.since)
        self._publish(now)

    def waiting(self) -> None:
        self._publish(0.0)

    def bound(self) -> float:
        if not self.durations:
            return FIRST_SECONDS
        return max(MIN_SECONDS, STEPS * statistics.median(self.durations))

    def run_ended(self) -> None:
        """The run is over for this replica (it finished, or the others finished without it)."""
        if self.shared is not None:
            self.shared[2] = 1.0

    def _publish(self, since: float) -> None:
        self.since = since
        if self.shared is not None:
            self.shared[1] = self.bound()
            self.shared[0] = since


def overdue(shared, now: float, starved: float = 0.0) -> float | None:
    """The launcher's side: how long the replica has computed (its step's wall time less the `starved`
    seconds it waited for a CPU meanwhile), if past its bound; else None."""
    since, bound = shared[0], shared[1]
    computed = now - since - starved
    return computed if since and computed > bound else None


def runqueue_seconds(pid: int) -> float:
    """Seconds the process's main thread has waited, runnable, for a CPU (0 where Linux's schedstat is
    not there to read)."""
    try:
        with open(f"/proc/{pid}/schedstat") as stats:
            return int(stats.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class CpuWaits:
    """The seconds each watched replica has waited for a CPU since its current step began."""

    def __init__(self):
        self.marks: dict = {}  # per replica: (the step's start, the run-queue wait then)

    def during_step(self, replica, pid: int, since: float) -> float:
        waited = runqueue_seconds(pid)
        mark = self.marks.get(replica)
        if mark is None or mark[0] != since:  # a new step: count from here
            self.marks[replica] = (since, waited)
            return 0.0
        return waited - mark[1]


def run_ended(shared) -> bool:
    """The launcher's side: whether the replica saw the run to its end before it exited."""
    return shared[2] == 1.0
