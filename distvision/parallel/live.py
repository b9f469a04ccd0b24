"""Live membership through torchft: replicas that come and go while the others train on.

Every worker is a replica group of one process with its own torchft Manager. At the start of each
round the Manager asks the Lighthouse for a quorum (the replicas whose heartbeats it hears), rebuilds
the reconfigurable gloo group over them if it changed, and heals a replica that is behind (a
newcomer, or one whose last step was discarded) from a live peer's memory over HTTP, before the
round's first forward pass. The round's all-reduces go through the Manager, which turns a peer's
death into a discarded round rather than a crash; `commit()` says whether the round counts.

Healing is signed with the job's secret and never unpickles (healing.py), and every listener of a
replica is bound to its bind_host, loopback unless told otherwise (live_listeners.py). This module,
healing.py and live_listeners.py are the only ones that import torchft; live_membership.py drives them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from torch.distributed import ReduceOp
from torch.distributed.distributed_c10d import AllgatherOptions

from distvision.errors import UserError
from distvision.fileio import write_json_atomic

LIGHTHOUSE_ADDRESS_VARIABLE = "TORCHFT_LIGHTHOUSE"  # torchft's own name for the Lighthouse's address
REPLICA_VARIABLE = "DISTVISION_REPLICA"  # this worker's replica number, set by the live launcher
JOINING_VARIABLE = "DISTVISION_JOINING"  # "1": respawned into a running job, heal from a peer
STARTED_AT_VARIABLE = "DISTVISION_STARTED_AT"  # time.time() when the launcher started the job
SPAWNED_AT_VARIABLE = "DISTVISION_SPAWNED_AT"  # time.time() when the launcher started this worker
FIRST_WORKERS_VARIABLE = "DISTVISION_FIRST_WORKERS"  # how many workers the launcher started at first
HEAL_FAILED_EXIT = 3  # a replica that could not heal exits with this status, and its launcher respawns it
DIVERGED_EXIT = 4  # a replica whose weights differ from its peers' exits with this, respawned to heal
ATTEMPT_VARIABLE = "DISTVISION_LIVE_ATTEMPT"  # the launch's id: audit records of a resumed run supersede
HEARTBEAT_INTERVAL = timedelta(milliseconds=100)  # each Manager's beat to the Lighthouse
QUORUM_TICK_MS = 20  # how often the Lighthouse checks whether a quorum can be issued
QUORUM_RETRY_SECONDS = 0.5  # torchft asks a Lighthouse that refused a quorum request again this often
LIGHTHOUSE_ANSWER_SECONDS = 10.0  # a node waits this long at its start for the Lighthouse to answer
QUORUM_ATTEMPTS = 3  # quorums that fail in a row while the Lighthouse answers: it cannot form one
# A restarted Lighthouse knows no replica until their heartbeats reach it, so its rule against split
# brain (a quorum needs more than half of the heartbeating replicas) cannot hold at first: the first
# replica to ask would get a quorum of its own. For this long after it is back, a replica does not
# train on a quorum of at most half its last one, and asks again.
LIGHTHOUSE_SETTLE_SECONDS = 3.0


def start_lighthouse(bind: str, heartbeat_timeout: float, join_timeout: float, min_replicas: int = 1):
    """A torchft Lighthouse serving in this process (its Rust threads); returns it, `.address()` to join."""
    quiet_torchft()
    from torchft._torchft import LighthouseServer

    return LighthouseServer(bind=bind, min_replicas=min_replicas, join_timeout_ms=int(join_timeout * 1000),
                            quorum_tick_ms=QUORUM_TICK_MS, heartbeat_timeout_ms=int(heartbeat_timeout * 1000))


def quiet_torchft() -> None:
    """torchft logs every quorum and commit, and a peer's death as an exception with its traceback,
    which the training loop handles and reports in one line (live_membership.py's membership events)."""
    for name in ("torchft", "torchft_quorums", "torchft_commits", "torchft_errors"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("RUST_LOG", "error")  # the Lighthouse and Manager servers (Rust) log every quorum


@dataclass
class Quorum:
    """What one quorum gave this replica: its rank among the participants, and how many there are."""

    rank: int
    participants: int
    quorum_id: int
    seconds: float  # waiting for the quorum (and healing)


class LiveReplica:
    """This process's torchft Manager and reconfigurable gloo group, and the state it heals from."""

    def __init__(self, lighthouse: str, replica_id: str, timeout: float, quorum_timeout: float, *,
                 secret: bytes, bind_host: str = "127.0.0.1"):
        """Join the Lighthouse as replica_id. Peers heal from each other only with the same `secret`
        (healing.load_secret); every server of this replica listens on bind_host only."""
        quiet_torchft()
        from torchft import Manager

        from distvision.parallel.healing import SignedHTTPTransport, reachable_host, url_host
        from distvision.parallel.live_listeners import (
            BoundProcessGroupGloo,
            bound_store,
            manager_server_bound_to,
        )

        # The replica group is this one process: it hosts its own store, which no other process reads, so
        # on loopback whatever bind_host is.
        self._store = bound_store("127.0.0.1")
        self._states: dict[str, tuple[Callable[[], object], Callable[[object], None]]] = {}
        transport = SignedHTTPTransport(secret, timedelta(seconds=timeout), host=bind_host)
        try:
            # Ours to keep: the quantized exchange gathers through it (torchft's Manager only sums).
            self.group = BoundProcessGroupGloo(bind_host, timeout=timedelta(seconds=timeout))
            with manager_server_bound_to(bind_host):
                self.manager = Manager(
                    pg=self.group,
                    load_state_dict=None, state_dict=None, min_replica_size=1,
                    # Quorum (and healing) before the forward pass: a replica knows its share of the round's
                    # samples before it loads them, and a newcomer trains from its very first round.
                    use_async_quorum=False,
                    timeout=timedelta(seconds=timeout), quorum_timeout=timedelta(seconds=quorum_timeout),
                    connect_timeout=timedelta(seconds=min(timeout, 10.0)),
                    # A Lighthouse that went away mid-quorum is asked again about every
                    # QUORUM_RETRY_SECONDS (torchft sleeps quorum_timeout / (retries + 1) after a refused
                    # call), until the quorum's timeout: a restarted one is joined again.
                    quorum_retries=max(1, int(quorum_timeout / QUORUM_RETRY_SECONDS)),
                    rank=0, world_size=1, store_addr="127.0.0.1", store_port=self._store.port,
                    lighthouse_addr=f"http://{lighthouse}" if "://" not in lighthouse else lighthouse,
                    replica_id=replica_id, hostname=url_host(reachable_host(bind_host)),
                    heartbeat_interval=HEARTBEAT_INTERVAL, checkpoint_transport=transport,
                    # Every replica builds its step-0 state from the same seed (torchft's advice for
                    # init_sync=False), so the first quorum sends nobody the model: over a 10 Mbit/s link
                    # that transfer took about 0.9 s of a 4-second caffe-quick epoch. Were the weights to
                    # differ all the same, the first round's fingerprints catch it: the round is redone
                    # and the odd replica heals (membership.agrees).
                    init_sync=False,
                )
        except RuntimeError as error:
            transport.shutdown(wait=False)
            raise UserError(f"cannot reach the torchft Lighthouse at {lighthouse}: {first_line(error)}") from None
        self.lighthouse = lighthouse
        self.transport = transport

    def share_state(self, key: str, save: Callable[[], object], load: Callable[[object], None]) -> None:
        """What a healing peer receives under `key` (save() is called only when a peer needs it)."""
        self.manager.register_state_dict_fn(key, load, save)

    def begin_round(self) -> Quorum:
        """Join this round's quorum (healing from a peer if behind); a lost Lighthouse is a UserError."""
        started = time.perf_counter()
        self.transport.failed_receive = None
        try:
            self.manager.start_quorum()
            rank, participants = self.manager.participating_rank(), self.manager.num_participants()
        except Exception as error:  # noqa: BLE001 - torchft raises its RPCs' own errors (RuntimeError, TimeoutError)
            raise LighthouseLost(f"lost the torchft Lighthouse at {self.lighthouse}: {first_line(error)}") from None
        if self.transport.failed_receive is not None:
            # torchft leaves the Manager errored and this replica unhealed, behind its peers: every round
            # it took part in would be discarded
            raise HealFailed(first_line(self.transport.failed_receive))
        return Quorum(rank if rank is not None else 0, max(participants, 1), self.manager._quorum_id,
                      time.perf_counter() - started)

    def allreduce_sum(self, buffers: list[torch.Tensor], while_waiting: Callable[[], None] | None = None,
                      gathered: Sequence[torch.Tensor] = (),
                      on_group: Sequence[Callable[[object], torch.futures.Future]] = (),
                      ) -> tuple[bool, list[list[torch.Tensor]]]:
        """Sum each buffer over the round's participants in place, gather each of `gathered` from every
        participant, and run each of `on_group` (a function of the replica group that starts collectives
        of its own and returns their future), all in flight at once; False when a peer failed (the round
        will not commit, and the results are garbage). while_waiting runs while gloo's thread exchanges."""
        in_flight = self.launch_sum(buffers, gathered, on_group)
        if while_waiting:
            while_waiting()
        return in_flight()

    def launch_sum(self, buffers: list[torch.Tensor], gathered: Sequence[torch.Tensor] = (),
                   on_group: Sequence[Callable[[object], torch.futures.Future]] = (),
                   ) -> Callable[[], tuple[bool, list[list[torch.Tensor]]]]:
        """Start allreduce_sum's collectives and return the wait for them, which gives what it gives:
        training goes on meanwhile (Streaming DiLoCo's overlap), within the round's quorum."""
        works = [self.manager.allreduce(buffer, reduce_op=ReduceOp.SUM) for buffer in buffers]
        gathers = [self._allgather(tensor) for tensor in gathered]
        launched = [self._on_group(launch) for launch in on_group]

        def wait() -> tuple[bool, list[list[torch.Tensor]]]:
            for work in works:
                work.wait()
            for future in [*(future for _, future in gathers), *launched]:
                future.wait()
            return self.manager.errored() is None, [outputs for outputs, _ in gathers]

        return wait

    def _allgather(self, tensor: torch.Tensor) -> tuple[list[torch.Tensor], torch.futures.Future]:
        """Every participant's copy of `tensor` (torchft's Manager only sums)."""
        self.manager.wait_quorum()
        if not self.manager.is_participating():
            tensor = torch.zeros_like(tensor)  # as torchft's allreduce zeroes a healing replica's share
        outputs = [torch.zeros_like(tensor) for _ in range(self.group.size())]
        return outputs, self._on_group(
            lambda group: group.allgather([outputs], [tensor], AllgatherOptions()).get_future())

    def _on_group(self, launch: Callable[[object], torch.futures.Future]) -> torch.futures.Future:
        """launch(group), on the replica group torchft configured for this quorum, with torchft's error
        handling: a failure marks the round, as a failed all-reduce does, and the future still ends."""
        self.manager.wait_quorum()
        failed = torch.futures.Future()
        failed.set_result(None)
        if self.manager.errored():
            return failed
        try:
            future = launch(self.group)
        except RuntimeError as error:  # a peer gone (gloo's error): the round fails, as a sum's would
            self.manager.report_error(error)
            return failed
        return self.manager.wrap_future(future, default=None)

    def forget_quorum(self) -> None:
        """After a quorum failed here (the Lighthouse went away): the next one starts afresh and rebuilds
        the group. torchft's start_quorum would re-raise the failed quorum's error, and it rebuilds its
        group only when the quorum id changes, while a restarted Lighthouse counts ids from 1 again
        (torchft has no public call for either)."""
        self.manager._quorum_future = None
        self.manager._quorum_id = -1

    def commit(self) -> bool:
        """Whether the round counts (every participant's all-reduces succeeded); else it is redone."""
        return self.manager.should_commit()

    def set_step(self, step: int) -> None:
        """torchft's step counts committed rounds; ours, optimizer steps. Keeping them equal (after a
        resume, and after each round of local steps) lets a replica that read an older checkpoint see
        that it is behind, and heal."""
        self.manager.load_state_dict({"step": step, "batches_committed": self.manager.batches_committed()})

    def forbid_state_reads(self) -> None:
        """While the parameters change, a healing peer must not read them half-updated."""
        self.manager.disallow_state_dict_read()

    def allow_state_reads(self) -> None:
        self.manager.allow_state_dict_read()

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)


class LighthouseWatch:
    """Whether the Lighthouse answers, polled from a daemon thread. The replicas need it only for a
    quorum: between quorums they train on without it, and a quorum waits for it to come back (a
    restarted Lighthouse at the same address is joined again). Once it has not answered for lost_after
    seconds, on_lost(message) is called from the thread."""

    def __init__(self, address: str, on_lost: Callable[[str], None], lost_after: float, every: float = 0.5):
        self.address, self.every = address, every
        self.host, self.port = host_and_port(address)
        self.down_since: float | None = None  # monotonic clock
        self.back_since: float | None = None  # when it last answered again after not answering

        def watch() -> None:
            while True:
                time.sleep(every)
                if self.answers():
                    if self.down_since is not None:
                        self.down_since, self.back_since = None, time.monotonic()
                    continue
                self.down_since = self.down_since or time.monotonic()
                if time.monotonic() - self.down_since >= lost_after:
                    on_lost(f"lost the torchft Lighthouse at {address}: no answer for {lost_after:g} s")
                    return

        threading.Thread(target=watch, name="lighthouse-watch", daemon=True).start()

    def answers(self) -> bool:
        return lighthouse_answers(self.address, self.every)

    def restarted_within(self, seconds: float) -> bool:
        """Whether it answered again, after not answering, less than `seconds` ago."""
        return self.back_since is not None and time.monotonic() - self.back_since < seconds

    def wait_until_back(self) -> None:
        """Until the Lighthouse answers (the watch calls on_lost meanwhile if it never does)."""
        while not self.answers():
            time.sleep(0.1)


def lighthouse_answers(address: str, timeout: float = 0.5) -> bool:
    """Whether something accepts connections at the Lighthouse's address."""
    try:
        socket.create_connection(host_and_port(address), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def check_live_addresses(lighthouse: str | None, bind: str | None) -> None:
    """Before any worker starts: --bind must be an address of this machine, and a given Lighthouse must
    answer (a one-line UserError each, instead of a traceback from the first server or a connect
    timeout in every worker)."""
    if bind:
        try:
            family, kind, _, _, address = socket.getaddrinfo(bind, 0, type=socket.SOCK_STREAM)[0]
            with socket.socket(family, kind) as probe:
                probe.bind(address)
        except (OSError, UnicodeError) as error:
            raise UserError(f"cannot listen on --bind {bind}: {getattr(error, 'strerror', None) or error}; "
                            "give an address of this machine") from None
    if lighthouse:  # it may be starting just now, as when a batch script starts it and the nodes at once
        deadline = time.monotonic() + LIGHTHOUSE_ANSWER_SECONDS
        while not lighthouse_answers(lighthouse):
            if time.monotonic() > deadline:
                raise UserError(f"the torchft Lighthouse at {lighthouse} does not answer (waited "
                                f"{LIGHTHOUSE_ANSWER_SECONDS:g} s): start it first, or check --lighthouse HOST:PORT")
            time.sleep(0.2)


def claim_run_dir(run_dir: Path, lighthouse: str) -> None:
    """A live job's nodes share their run folder (each under its own torchrun, where no lock can span
    the machines), so the folder names the job's Lighthouse: a node of another job, whose Lighthouse
    answers, is refused (a UserError); a folder whose Lighthouse is gone (a stopped or finished job)
    is taken over, e.g. by its --resume."""
    record = run_dir / "live" / "lighthouse.json"
    try:
        recorded = json.loads(record.read_text())["lighthouse"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded and recorded != lighthouse and lighthouse_answers(recorded):
        raise UserError(f"--out {run_dir} belongs to another live job (its Lighthouse at {recorded} answers); "
                        "give this one its own --out")
    if recorded != lighthouse:
        record.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record, {"lighthouse": lighthouse})


def host_and_port(address: str) -> tuple[str, int]:
    """The host (without IPv6 brackets) and port of a Lighthouse address, HOST:PORT or a URL."""
    host, port = address.split("://")[-1].rsplit(":", 1)
    return host.strip("[]"), int(port)


def interface_towards(address: str) -> str:
    """The local address of the interface that reaches `address` (HOST:PORT): loopback for a local
    Lighthouse, the cluster interface for a remote one. No packet is sent (a UDP socket's connect)."""
    try:
        family, _, _, _, target = socket.getaddrinfo(*host_and_port(address), type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(target)
            return probe.getsockname()[0]
    except (OSError, ValueError) as error:
        raise UserError(f"cannot find the interface that reaches the Lighthouse at {address} ({error}); "
                        "give --bind HOST") from None


class HealFailed(Exception):
    """This replica was behind and could not fetch a peer's state (refused, or the peer died)."""


class LighthouseLost(UserError):
    """The Lighthouse stopped answering: the job cannot form a quorum any more."""


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
