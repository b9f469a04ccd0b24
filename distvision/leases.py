"""Leases on a shared file system: which process works on a job now.

A claim is a file created with O_EXCL (atomic on local and NFSv3+ file systems) holding its owner.
The owner renews it by touching it; a claim not renewed for `lease_seconds` is expired, and the
first process to rename it away (rename is atomic: only one succeeds) may claim the job afresh.
An owner that finds its claim gone or taken has lost the lease and must stop working on the job.
`distvision train-each` uses them so that several processes split the subsets between them.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Claim:
    path: Path
    owner: str  # unique per claim: host, pid and a random part

    def renew(self) -> bool:
        """Touch the claim; False when it is no longer ours (expired and taken over)."""
        if not self.held():
            return False
        os.utime(self.path)
        return True

    def held(self) -> bool:
        try:
            return json.loads(self.path.read_text()).get("owner") == self.owner
        except (OSError, ValueError):
            return False

    def release(self) -> None:
        if self.held():
            self.path.unlink(missing_ok=True)


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def try_claim(path: Path, lease_seconds: float) -> Claim | None:
    """Claim the job behind path, or None while another live owner holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = Claim(path, owner_id())
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        age = None
    if age is not None:
        if age < lease_seconds:
            return None
        try:  # expired: whoever renames it first takes the job over
            os.rename(path, path.with_name(f"{path.name}.expired-{uuid.uuid4().hex[:8]}"))
        except FileNotFoundError:
            return None
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(descriptor, "w") as handle:
        json.dump({"owner": claim.owner, "host": socket.gethostname(), "pid": os.getpid(),
                   "claimed_at": time.time()}, handle)
    return claim


def claimed_by_other(path: Path, lease_seconds: float) -> bool:
    """True while someone holds a live (recently renewed) claim on path."""
    try:
        return time.time() - path.stat().st_mtime < lease_seconds
    except FileNotFoundError:
        return False
