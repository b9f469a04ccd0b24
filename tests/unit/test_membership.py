"""The membership's pure logic, without processes: rollback, the exchange's flat layout, membership
events, the shares of a round after a change of participants, and DiLoCo's outer state in checkpoints."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distvision.data.sharding import rank_slice
from distvision.evaluate import EVAL_CHUNK, evaluate_part, result_of
from distvision.parallel.fragments import OuterFragments
from distvision.parallel.live_membership import MembershipLog
from distvision.parallel.membership import (
    Rollback,
    Seat,
    StaticMembership,
    clone,
    flatten,
    majority_fingerprint,
    trainable,
    unflatten_into,
    weights_fingerprint,
)
from distvision.training.checkpoints import CheckpointManager
from distvision.training.state import TrainState


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))


def _train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(8, 4)).square().sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_a_discarded_round_of_local_steps_is_undone_exactly():
    """Weights, batch-norm statistics, optimizer momentum, cursor and step all return to the round's start."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train_steps(model, optimizer, 2)  # momentum buffers exist before the round
    before_state = clone(model.state_dict())
    before_optimizer = clone(optimizer.state_dict())
    rollback = Rollback.take(model, optimizer, cursor=40, step=5, keep_weights=True)
    _train_steps(model, optimizer, 3)
    assert not torch.equal(model.state_dict()["0.weight"], before_state["0.weight"])
    assert rollback.restore(model, optimizer) == (40, 5)
    for name, value in before_state.items():
        assert torch.equal(model.state_dict()[name], value), name
    for index, saved in before_optimizer["state"].items():
        assert torch.equal(optimizer.state_dict()["state"][index]["momentum_buffer"], saved["momentum_buffer"])


def test_a_discarded_gradient_round_restores_the_statistics_but_keeps_the_weights():
    """Averaging gradients, the optimizer has not stepped before the commit: only buffers move."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rollback = Rollback.take(model, optimizer, cursor=0, step=0, keep_weights=False)
    statistics = model[1].running_mean.clone()
    model(torch.randn(8, 4)).sum().backward()  # a forward pass in training mode moves the running mean
    assert not torch.equal(model[1].running_mean, statistics)
    rollback.restore(model, optimizer)
    assert torch.equal(model[1].running_mean, statistics)
    assert all(p.grad is None for p in model.parameters())  # the discarded round's gradients are gone


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=3), min_size=1, max_size=5))
def test_flatten_then_unflatten_is_the_identity(shapes):
    tensors = [torch.randn(*shape) for shape in shapes]
    targets = [torch.zeros(*shape) for shape in shapes]
    unflatten_into(flatten(tensors), targets, as_grad=False)
    for tensor, target in zip(tensors, targets, strict=True):
        assert torch.equal(tensor, target)
    with pytest.raises(ValueError):  # a payload of another layout is never silently truncated
        unflatten_into(torch.zeros(flatten(tensors).numel() + 1), targets, as_grad=False)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3 * EVAL_CHUNK))
def test_an_evaluation_in_parts_sums_to_the_whole(parts, images):
    """Each participant evaluates its part: the summed counts are the whole split's, whatever the number."""
    from distvision.data.batches import Preprocessing

    torch.manual_seed(images)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    pixels = np.random.default_rng(images).integers(0, 256, (images, 2, 2, 3), dtype=np.uint8)
    labels = np.random.default_rng(parts).integers(0, 3, images)
    preprocess = Preprocessing.build("standardize", [0.5] * 3, [0.25] * 3, None)
    split = (model, pixels, labels, preprocess, "fp32", torch.device("cpu"), False, False, None)
    whole = result_of(evaluate_part(*split, 0, 1))
    summed = result_of(sum(evaluate_part(*split, part, parts) for part in range(parts)))
    assert (summed.correct, summed.count) == (whole.correct, whole.count) and summed.count == images
    assert summed.loss == pytest.approx(whole.loss)


def test_a_membership_change_is_logged_once_at_its_first_committed_round():
    log = MembershipLog(last_commit=100.0)
    log.observe(quorum_id=1, participants=2, seconds=0.1, where={"step": 0, "epoch": 1, "cursor": 0})
    assert log.committed(now=101.0) is None  # the first quorum is the start, not a change
    log.discarded_rounds += 1  # a peer died in the next round
    log.observe(quorum_id=2, participants=1, seconds=0.3, where={"step": 7, "epoch": 1, "cursor": 56})
    log.observe(quorum_id=2, participants=1, seconds=0.0, where={"step": 7, "epoch": 1, "cursor": 56})  # same quorum
    event = log.committed(now=103.5)
    assert event == {"event": "membership", "old_participants": 2, "new_participants": 1, "step": 7, "epoch": 1,
                     "cursor": 56, "discarded_steps": 1, "quorum_seconds": 0.3, "stall_seconds": 2.5, "time": 103.5}
    assert log.committed(now=104.0) is None and log.commits == 3 and log.discarded_rounds == 0
    healed = MembershipLog()
    healed.load(log.state_dict())  # a newcomer continues the counts it healed from
    assert healed.state_dict() == log.state_dict()


@pytest.mark.parametrize("participants", [1, 2, 3, 5])
def test_after_a_change_the_participants_shares_still_cover_the_batch_once(participants):
    """Whoever takes part in a round, their shares of each global batch are disjoint and cover it."""
    batch = np.arange(100, 117)
    seat = Seat(0, participants)
    shares = []
    for rank in range(participants):
        seat.rank = rank
        shares.append(rank_slice(batch, seat.rank, seat.participants))
    assert sorted(np.concatenate(shares).tolist()) == batch.tolist()


def test_a_static_round_always_commits_and_sums_nothing_alone():
    membership = StaticMembership(Seat(0, 1))
    values = torch.tensor([1.0, 2.0])
    assert membership.begin_round() == 0.0 and membership.allreduce(values) and membership.commit()
    assert values.tolist() == [1.0, 2.0]


def test_diloco_outer_momentum_and_agreed_weights_survive_a_checkpoint(tmp_path):
    model = _model()
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    fragments = OuterFragments(trainable(model), 2)
    _train_steps(model, outer, 2)
    fragments.committed(fragments.bounds[0])  # one fragment agreed after the steps, the other before them
    settings_ = {"model": "mlp", "seed": 0}
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    CheckpointManager(tmp_path, Seat(0, 1), settings_, 3600).save(TrainState(1, step=2), model, inner, None, outer,
                                                                  fragments)
    fresh = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    fresh_fragments = OuterFragments(trainable(model), 2)  # its anchors: the weights as they are
    CheckpointManager(tmp_path, Seat(0, 1), settings_, 3600).resume(model, inner, None, fresh, fresh_fragments)
    for parameter in model.parameters():
        assert torch.equal(fresh.state[parameter]["momentum_buffer"], outer.state[parameter]["momentum_buffer"])
    assert fresh_fragments.rounds == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh_fragments.anchors, fragments.anchors, strict=True))
    assert not torch.equal(fresh_fragments.anchors[-1], trainable(model)[-1])  # the second's from before the steps


def test_the_replicas_weights_fingerprint_is_the_majoritys_and_rank_0s_on_a_tie():
    assert majority_fingerprint([7, 7, 0]) is None  # agreed (a 0 is a replica that took none)
    assert majority_fingerprint([7, 9, 7]) == 7 and majority_fingerprint([9, 7, 7]) == 7
    assert majority_fingerprint([9, 7]) == 9 and majority_fingerprint([0, 7, 9]) == 7


def test_a_fingerprint_changes_with_any_weight_and_fits_a_float32():
    model = _model()
    def tensors(replica):
        return [*replica.parameters(), *replica.buffers()]

    before = weights_fingerprint(tensors(model))
    assert before == weights_fingerprint(tensors(clone_model(model)))
    with torch.no_grad():
        model[2].bias[0] += 1e-7
    after = weights_fingerprint(tensors(model))
    assert after != before and all(0 < value < 2**24 and float(np.float32(value)) == value for value in (before, after))


def clone_model(model: torch.nn.Module) -> torch.nn.Module:
    copy = _model()
    copy.load_state_dict(model.state_dict())
    return copy


def test_the_watchdog_does_not_count_the_time_a_replica_waited_for_a_cpu():
    """A step 20 s long of which 12 s were spent runnable but not running (an overloaded machine) has
    computed 8 s: within a 10 s bound. The run-queue wait is read from the kernel, counted per step."""
    from distvision.parallel import watchdog

    shared = [100.0, 10.0, 0.0]  # computing since t=100, bound 10 s
    assert watchdog.overdue(shared, 120.0) == 20.0
    assert watchdog.overdue(shared, 120.0, starved=12.0) is None
    assert watchdog.overdue(shared, 125.0, starved=12.0) == 13.0
    waits = watchdog.CpuWaits()
    me = os.getpid()
    assert waits.during_step("r", me, since=100.0) == 0.0  # the step's first look marks where it starts
    sum(range(200_000))  # some work of this thread's
    later = waits.during_step("r", me, since=100.0)
    assert later >= 0.0 and watchdog.runqueue_seconds(me) >= later
    assert waits.during_step("r", me, since=130.0) == 0.0  # a new step counts from its own start
    assert watchdog.runqueue_seconds(2**22 + 12345) == 0.0  # no such process: nothing to subtract


def test_the_watchdog_bounds_a_step_by_the_recent_median_and_ignores_waiting():
    from multiprocessing.sharedctypes import RawArray

    from distvision.parallel import watchdog

    shared = RawArray("d", watchdog.SLOTS)
    watchdog.watch_this_replica(shared)
    try:
        clock = watchdog.ComputeClock()
        clock.computing()
        assert shared[1] == watchdog.FIRST_SECONDS and watchdog.overdue(shared, shared[0] + 60) is None
        assert watchdog.overdue(shared, shared[0] + watchdog.FIRST_SECONDS + 1) is not None
        clock.durations.extend([2.0, 2.0, 3.0])
        clock.stepped()
        assert shared[1] == watchdog.STEPS * 2.0 and shared[0] > 0  # the median of 2, 2, 3 and this short step
        clock.waiting()  # waiting for peers is never overdue
        assert shared[0] == 0 and watchdog.overdue(shared, 10**12) is None
        clock.durations.clear()
        clock.durations.extend([0.01] * 5)
        clock.computing()
        assert shared[1] == watchdog.MIN_SECONDS
    finally:
        watchdog.watch_this_replica(None)
