"""A launcher's worker processes, found through /proc (Linux): for the tests and benchmarks that kill,
stop or watch one worker of a running job. distvision itself never needs it.
"""

from __future__ import annotations

from pathlib import Path


def local_worker_pids(agent_pid: int) -> dict[int, int]:
    """{local rank: pid} of the workers an agent process (distvision train or torchrun) runs now.

    torchrun's workers carry LOCAL_RANK in their start-up environment; the workers our launcher forks
    (children of its forkserver, a child of the agent) get it only after start, but are forked in
    local-rank order.
    """
    workers, forked = {}, []
    for child in _children(agent_pid):
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        variables = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if b"LOCAL_RANK" in variables:
            workers[int(variables[b"LOCAL_RANK"])] = child
        elif b"forkserver" in command:
            forked += _children(child)
    return workers or dict(enumerate(sorted(forked)))


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return children
