"""train-each's leases: one owner per job while it renews; an expired claim is taken over, and its old
owner learns it lost the lease. Ages are set with os.utime, not waited for."""

from __future__ import annotations

import os
import time
from pathlib import Path

from distvision.leases import claimed_by_other, try_claim

LEASE = 60.0


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_live_claim_is_exclusive_and_renewal_keeps_it(tmp_path: Path):
    path = tmp_path / "claims" / "a.claim"
    first = try_claim(path, LEASE)
    assert first is not None and first.held() and claimed_by_other(path, LEASE)
    assert try_claim(path, LEASE) is None
    age(path, LEASE - 5)  # nearly expired, then renewed: live again for a whole lease
    assert not claimed_by_other(path, 10)
    assert first.renew()
    assert claimed_by_other(path, 10)  # renewed just now
    assert try_claim(path, LEASE) is None


def test_an_expired_claim_is_taken_over_and_its_owner_loses_the_lease(tmp_path: Path):
    path = tmp_path / "a.claim"
    first = try_claim(path, LEASE)
    age(path, LEASE + 1)  # not renewed in time: its owner is presumed dead
    assert not claimed_by_other(path, LEASE)
    second = try_claim(path, LEASE)
    assert second is not None and second.held()
    assert not first.held() and not first.renew()  # the old owner must stop working on the job
    first.release()  # and cannot remove the new owner's claim
    assert second.held()
    second.release()
    assert not path.exists() and try_claim(path, LEASE) is not None
