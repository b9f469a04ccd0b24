"""A live replica's network side, in this process: nothing a live job opens on one machine can be reached
from the network (every socket a replica and the Lighthouse listen on is bound to the host they were
given; Linux: read from /proc), and a replica heals from its peer through torchft only with the job's
secret.

There are no exceptions to list: each listener torch and torchft open for a replica can be bound (see
distvision/parallel/live_listeners.py for how, and healing.py for the transport).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from pathlib import Path

import pytest
import torch

from distvision.errors import UserError
from distvision.parallel.healing import new_secret
from distvision.parallel.live import (
    HealFailed,
    LiveReplica,
    claim_run_dir,
    lighthouse_answers,
    start_lighthouse,
)
from tests.helpers import wait_for

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets in /proc")

# The Manager's gRPC server, the healing transport, the gloo group's rendezvous store and gloo itself,
# and the replica group's own TCPStore.
REPLICA_LISTENERS = 5


def listening_sockets() -> set[tuple[str, int]]:
    """(address, port) of every TCP socket this process listens on."""
    inodes = set()
    for descriptor in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(descriptor)
        except OSError:  # closed since the listing
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    listening = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[start:start + 4][::-1] for start in range(0, len(raw), 4))
            listening.add((socket.inet_ntop(family, raw), int(port, 16)))
    return listening


def start_replica(bind_host: str | None):
    """A Lighthouse on loopback and one replica through its first quorum (which builds the gloo group)."""
    lighthouse = start_lighthouse("127.0.0.1:0", 1.0, 5.0)
    address = f"127.0.0.1:{lighthouse.address().rsplit(':', 1)[1]}"
    hosts = {} if bind_host is None else {"bind_host": bind_host}
    secret = bytes.fromhex(new_secret())
    replica = LiveReplica(address, "r0", timeout=10, quorum_timeout=10, secret=secret, **hosts)
    replica.share_state("probe", lambda: {"step": 0}, lambda saved: None)
    replica.begin_round()
    return lighthouse, replica


def test_every_listener_of_a_replica_and_the_lighthouse_is_on_loopback():
    before = listening_sockets()
    lighthouse, replica = start_replica(bind_host=None)  # LiveReplica's default
    try:
        opened = listening_sockets() - before
        assert len(opened) == REPLICA_LISTENERS + 1, opened
        assert [(host, port) for host, port in opened if not ipaddress.ip_address(host).is_loopback] == []
    finally:
        replica.shutdown()
        lighthouse.shutdown()


def test_each_listener_of_a_replica_follows_its_bind_host():
    """127.0.0.2 is loopback too (Linux routes 127/8 there) but nothing listens on it by default: a
    listener found on it was bound to bind_host, not to loopback by luck (this machine's hostname may
    resolve to 127.0.0.1, where torch's default gloo device would listen)."""
    before = listening_sockets()
    lighthouse, replica = start_replica(bind_host="127.0.0.2")
    try:
        opened = listening_sockets() - before
        lighthouse_port = int(lighthouse.address().rsplit(":", 1)[1])
        replica_store = ("127.0.0.1", replica._store.port)  # read by this process alone: always loopback
        assert {("127.0.0.1", lighthouse_port), replica_store} <= opened
        others = opened - {("127.0.0.1", lighthouse_port), replica_store}
        assert len(others) == REPLICA_LISTENERS - 1 and {host for host, _ in others} == {"127.0.0.2"}, opened
    finally:
        replica.shutdown()
        lighthouse.shutdown()


@pytest.mark.parametrize("same_secret, ahead_at", [(True, 5), (False, 5), (True, 0)])
def test_a_replica_behind_heals_from_its_peer_only_with_the_jobs_secret(same_secret, ahead_at):
    """...and a fresh job's replicas, both at step 0, send each other nothing (init_sync=False: seeded
    alike, they start from the same state; distvision's first-round fingerprints check that)."""
    lighthouse = start_lighthouse("127.0.0.1:0", 1.0, 5.0, min_replicas=2)
    address = f"127.0.0.1:{lighthouse.address().rsplit(':', 1)[1]}"
    secret = bytes.fromhex(new_secret())
    ahead = LiveReplica(address, "ahead", timeout=10, quorum_timeout=20, secret=secret)
    behind = LiveReplica(address, "behind", timeout=10, quorum_timeout=20,
                         secret=secret if same_secret else bytes.fromhex(new_secret()))
    healed, committed = {}, {}
    ahead.share_state("model", lambda: {"weights": torch.full((3,), 7.0), "betas": (0.9, 0.99)},
                      healed.update)
    behind.share_state("model", lambda: {"weights": torch.zeros(3), "betas": (0.5, 0.5)}, healed.update)
    ahead.set_step(ahead_at)

    def round_of(name: str, replica: LiveReplica) -> None:
        try:
            replica.begin_round()
        except HealFailed:  # the replica exits, to be respawned (live_membership.py)
            committed[name] = "could not heal"
            return
        # The peer ahead commits only once the one behind has healed and joined this exchange (a failed
        # heal leaves it out, and nobody waits for it).
        exchanged = replica.allreduce_sum(torch.ones(2)) if same_secret else True
        committed[name] = exchanged and replica.commit()

    rounds = [threading.Thread(target=round_of, args=item, daemon=True)  # a hang fails the test, not the run
              for item in (("ahead", ahead), ("behind", behind))]
    try:
        for each in rounds:
            each.start()
        for each in rounds:
            each.join(30)
        if ahead_at == 0:
            assert committed == {"ahead": True, "behind": True} and healed == {}
            assert behind.manager.current_step() == 1
        elif same_secret:
            assert committed == {"ahead": True, "behind": True}
            assert torch.equal(healed["weights"], torch.full((3,), 7.0)) and healed["betas"] == (0.9, 0.99)
            assert behind.manager.current_step() == 6
        else:
            assert committed["behind"] == "could not heal" and healed == {}
    finally:
        ahead.shutdown()
        behind.shutdown()
        lighthouse.shutdown()


def test_a_live_run_folder_belongs_to_the_job_whose_lighthouse_answers(tmp_path: Path):
    """Nodes of one job (one Lighthouse) share the folder; a node of another job is refused while the
    first job's Lighthouse answers, and takes the folder over once it is gone."""
    first = start_lighthouse("127.0.0.1:0", 1.0, 5.0)
    second = start_lighthouse("127.0.0.1:0", 1.0, 5.0)
    first_address, second_address = (f"http://127.0.0.1:{server.address().rsplit(':', 1)[1]}"
                                      for server in (first, second))
    claim_run_dir(tmp_path, first_address)
    claim_run_dir(tmp_path, first_address)  # another node of the same job
    with pytest.raises(UserError, match="belongs to another live job"):
        claim_run_dir(tmp_path, second_address)
    first.shutdown()
    wait_for(lambda: not lighthouse_answers(first_address), 10, "the first Lighthouse to stop")
    claim_run_dir(tmp_path, second_address)  # the first job is gone: e.g. a --resume under a new one
    second.shutdown()
