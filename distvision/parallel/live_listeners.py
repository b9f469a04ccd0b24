"""A live replica's listeners on the host the user chose (loopback for a job on one machine).

Besides the healing transport (healing.py), a replica listens through torch and torchft in three places,
and left alone two of them listen on every interface and the third on whatever the machine's hostname
resolves to. Each is bound here, where torch and torchft let us:

- its replica group's TCPStore: torch binds a master store on every interface unless it is handed a
  listening socket (TCPStore's master_listen_fd, libuv backend); bound_store binds that socket first.
- the Manager's gRPC server: torchft's Manager asks for "[::]:{port}" (torchft/manager.py:308, with no
  parameter to change it), though ManagerServer binds whatever it is given; manager_server_bound_to
  swaps in a ManagerServer that binds the host while the Manager is built.
- the reconfigurable gloo group: torchft hosts each group's rendezvous store on every interface and
  advertises socket.gethostname() (ProcessGroup.get_reconfigure_handle, torchft/process_group.py:404),
  and torch's default gloo device listens on the hostname's address; BoundProcessGroupGloo binds both.

The Lighthouse takes its bind address (live.start_lighthouse). live.py imports this module after
quiet_torchft(): torchft reads RUST_LOG when it is first imported.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial

import torchft.manager
import torchft.process_group
from torch.distributed import ProcessGroupGloo as GlooBackend
from torch.distributed import Store, TCPStore
from torchft import ProcessGroupGloo

from distvision.parallel.healing import WILDCARD_HOSTS, reachable_host, url_host

LISTEN_BACKLOG = 128


def bound_store(host: str) -> TCPStore:
    """A master TCPStore that listens on `host` only (port chosen by the system)."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((host, 0))
        listener.listen(LISTEN_BACKLOG)
        store = TCPStore(reachable_host(host), listener.getsockname()[1], is_master=True,
                         wait_for_workers=False, master_listen_fd=listener.fileno(), use_libuv=True)
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store's server owns the socket now, and closes it when the store goes
    return store


@contextmanager
def manager_server_bound_to(host: str) -> Iterator[None]:
    """While torchft's Manager is built in this block, its gRPC server listens on `host`."""
    if host in WILDCARD_HOSTS:  # what torchft does anyway
        yield
        return
    unbound = torchft.manager.ManagerServer

    def bound(**settings):  # the Manager passes keywords only
        port = settings["bind"].rsplit(":", 1)[1]
        return unbound(**dict(settings, bind=f"{url_host(host)}:{port}"))

    with replaced(torchft.manager, "ManagerServer", bound):
        yield


class BoundProcessGroupGloo(ProcessGroupGloo):
    """torchft's reconfigurable gloo group, its rendezvous store and gloo's own listener on `host`."""

    def __init__(self, host: str, timeout: timedelta):
        super().__init__(timeout=timeout)
        self.host = host

    def get_reconfigure_handle(self) -> str:
        """torchft's handle (peers rendezvous on the first one's store), with that store on our host.

        torchft namespaces a rendezvous by the quorum id alone, and a restarted Lighthouse counts ids
        from 1 again: the same namespace on the same store would hand the new group the gloo addresses
        of an old one (20 s connect timeouts each, seen after a kill and a Lighthouse restart). So each
        quorum request's handle names a namespace of its own (torchft asks for a handle per request)."""
        if self._rendezvous_store is None:
            self._rendezvous_store = bound_store(self.host)
        address = f"{url_host(reachable_host(self.host))}:{self._rendezvous_store.port}"
        return json.dumps({"id": self._handle_id(), "global_rank": self._global_rank,
                           "store": f"{address}/{uuid.uuid4().hex}"})

    def _create_pg(self, store: Store, rank: int, world_size: int):
        if self.host in WILDCARD_HOSTS:  # gloo listens on one address; torch's default picks the hostname's
            return super()._create_pg(store, rank, world_size)
        with replaced(torchft.process_group, "BaseProcessGroupGloo", partial(gloo_backend, self.host)):
            return super()._create_pg(store, rank, world_size)


def gloo_backend(host: str, store: Store, rank: int, world_size: int, timeout: timedelta) -> GlooBackend:
    """torch's gloo backend as torchft makes it (store, rank, size, timeout), listening on `host`."""
    options = GlooBackend._Options()
    options._devices = [GlooBackend.create_device(hostname=host)]
    options._timeout = timeout
    options._threads = 2  # what torch gives a backend made with a timeout alone
    return GlooBackend(store, rank, world_size, options)


@contextmanager
def replaced(module, name: str, value) -> Iterator[None]:
    """module.name is value inside the block. getattr first: a torchft that renamed it fails loudly."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)
