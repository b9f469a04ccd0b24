"""Batch splitting, throughput balancing, the exchange interval and stopping rules, without processes
(synchronisation modes, balancing and stopping with real gloo processes: tests/e2e/test_sync.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distvision.config import TrainConfig, steps_this_round
from distvision.data.sharding import global_batches
from distvision.parallel.balance import (
    REBALANCE_EVERY,
    REBALANCE_THRESHOLD,
    ThroughputBalancer,
    scaled_lr,
    split_sizes,
    warmup_factor,
    weighted_slice,
)
from distvision.parallel.stopping import StopRules, stop_after_epoch, time_is_up
from distvision.parallel.sync import (
    LOCAL_SGD_STATS_SECONDS,
    STATS_EVERY,
    Synchronizer,
    SyncSettings,
    half_precision_wire,
    restore_half_precision,
    stats_interval,
)
from distvision.training.faults import STOP_GRACE_SECONDS


def test_weighted_slices_cover_every_sample_once():
    for total in (2, 7, 16, 101):
        for shares in ([0.5, 0.5], [0.9, 0.1], [0.2, 0.3, 0.5], [0.97, 0.01, 0.01, 0.01]):
            if total < len(shares):
                continue
            sizes = split_sizes(total, np.array(shares))
            assert sizes.sum() == total and sizes.min() >= 1
            batch = np.arange(total) * 3
            parts = np.concatenate([weighted_slice(batch, r, np.array(shares)) for r in range(len(shares))])
            assert np.array_equal(parts, batch)


def test_throughput_balancer_moves_work_to_the_faster_worker():
    balancer = ThroughputBalancer(2, enabled=True)
    changed = [balancer.observe(np.array([0.1, 0.3]), np.array([8, 8])) for _ in range(6)]  # 1 warm-up + 5
    assert changed[-1] and balancer.shares[0] == pytest.approx(0.75)


def test_throughput_balancer_follows_drift_but_not_noise():
    balancer = ThroughputBalancer(2, enabled=True)
    for _ in range(6):  # 1 warm-up + MEASURE_STEPS: shares 0.75 / 0.25
        balancer.observe(np.array([0.1, 0.3]), np.array([8, 8]))

    def window_wanting(share: float) -> bool:
        # Rank 0 takes 12 samples in 0.1 s; rank 1's time for its 4 makes share the speed-proportional split.
        rank1_seconds = 4 / (120 * (1 - share) / share)
        changed = [balancer.observe(np.array([0.1, rank1_seconds]), np.array([12, 4]))
                   for _ in range(REBALANCE_EVERY)]
        return changed[-1] and not any(changed[:-1])

    assert not window_wanting(0.75 - REBALANCE_THRESHOLD / 2)  # noise: the shares stay
    assert balancer.shares[0] == pytest.approx(0.75)
    assert window_wanting(0.75 - REBALANCE_THRESHOLD * 1.5)  # a drift: re-split, once per window
    assert balancer.shares[0] == pytest.approx(0.75 - REBALANCE_THRESHOLD * 1.5)


def test_losses_and_votes_are_exchanged_about_once_a_second_at_most_every_16_steps():
    # caffe-quick on a CPU (45 ms steps), shorter steps, a GPU's, and CPU fastnet or resnet steps.
    assert [stats_interval(s) for s in (0.045, 0.125, 0.001, 0.6, 3.0, 40.0)] == [16, 8, STATS_EVERY, 1, 1, 1]
    # Local SGD every 5 s: 16 fastnet steps of 3 s would leave a stop request unseen past its 20 s grace.
    assert [stats_interval(s, LOCAL_SGD_STATS_SECONDS) for s in (0.045, 0.6, 3.0, 40.0)] == [16, 8, 1, 1]
    assert STOP_GRACE_SECONDS > 2 * LOCAL_SGD_STATS_SECONDS


def test_stopping_rules():
    history = [{"test_accuracy": a, "val_accuracy": a} for a in (0.5, 0.6, 0.61, 0.605, 0.6)]
    assert stop_after_epoch(StopRules(10, target_accuracy=0.6), history[:2]) == "target_accuracy"
    assert stop_after_epoch(StopRules(10, patience=2, min_delta=0.02), history[:4]) == "patience"
    assert stop_after_epoch(StopRules(10, patience=3, min_delta=0.02), history[:4]) is None
    assert stop_after_epoch(StopRules(5), history) == "max_epochs"


def test_target_accuracy_watches_the_last_epoch_of_the_monitored_split():
    history = [{"test_accuracy": a, "val_accuracy": v} for a, v in ((0.7, 0.2), (0.3, 0.8), (0.5, 0.4))]
    rules = StopRules(10, target_accuracy=0.6)
    assert stop_after_epoch(rules, history[:1]) == "target_accuracy"
    assert stop_after_epoch(rules, history) is None  # 0.7 was two epochs ago
    assert stop_after_epoch(StopRules(10, target_accuracy=0.6, monitor="val"), history[:2]) == "target_accuracy"
    assert stop_after_epoch(StopRules(10, target_accuracy=0.6, monitor="val"), history[:1]) is None
    assert stop_after_epoch(rules, []) is None


def test_patience_counts_epochs_without_more_than_min_delta_of_gain():
    rise = [{"test_accuracy": a} for a in (0.5, 0.52, 0.51, 0.53, 0.52)]
    # 2 epochs of patience need 3 records; a gain of exactly min_delta is no improvement.
    assert stop_after_epoch(StopRules(10, patience=2, min_delta=0.0), rise[:2]) is None
    assert stop_after_epoch(StopRules(10, patience=2, min_delta=0.03), rise[:3]) == "patience"
    assert stop_after_epoch(StopRules(10, patience=2, min_delta=0.03), rise[:4]) == "patience"
    assert stop_after_epoch(StopRules(10, patience=1, min_delta=0.005), rise[:4]) is None  # 0.53 > 0.525
    exact = [{"test_accuracy": a} for a in (0.5, 0.5, 0.75)]
    assert stop_after_epoch(StopRules(10, patience=1, min_delta=0.25), exact) == "patience"
    # the window is the last `patience` epochs: here 0.6 in it beats 0.5 before it
    assert stop_after_epoch(StopRules(10, patience=2), [{"test_accuracy": a} for a in (0.5, 0.6, 0.4)]) is None
    late = [{"test_accuracy": a} for a in (0.5, 0.4, 0.45, 0.6)]
    assert stop_after_epoch(StopRules(10, patience=3), late) is None  # the newest epoch is the best


def test_max_time_and_the_rules_from_the_flags():
    config = TrainConfig(data="unused", target_accuracy=0.9, patience=4, min_delta=0.01, monitor="val",
                         max_time=30.0)
    assert StopRules.from_config(config, max_epochs=7) == StopRules(7, 0.9, 4, 0.01, "val", 30.0)
    assert time_is_up(StopRules(7, max_time=30.0), 30.0) and not time_is_up(StopRules(7, max_time=30.0), 29.9)
    assert not time_is_up(StopRules(7), 1e9)


def test_lr_scaling_and_warmup():
    assert scaled_lr(0.1, 512, 128, "linear") == pytest.approx(0.4)
    assert scaled_lr(0.1, 512, 128, "sqrt") == pytest.approx(0.2)
    assert scaled_lr(0.1, 512, 128, "none") == 0.1
    with pytest.raises(KeyError):
        scaled_lr(0.1, 512, 128, "cubic")
    # from near zero (never exactly: the first step would learn nothing) up to 1, then 1
    assert [warmup_factor(e, 2.0) for e in (0.0, 0.5, 1.0, 2.0, 5.0)] == pytest.approx(
        [0.0005, 0.2505, 0.5005, 1.0, 1.0])
    assert warmup_factor(0.0, 0.0) == 1.0
    assert warmup_factor(0.25, 0.5) == pytest.approx(0.502)  # warmups shorter than an epoch too


def test_batch_tails_and_minimum_shares():
    # a tail as large as the world size keeps its own step; a smaller one joins the batch before it
    assert [len(b) for b in global_batches(np.arange(10), 4, 2)] == [4, 4, 2]
    assert [len(b) for b in global_batches(np.arange(9), 4, 2)] == [4, 5]
    assert [len(b) for b in global_batches(np.arange(3), 4, 4)] == [3]  # one batch: nothing to fold into
    sizes = split_sizes(10, np.array([1.0, 0.01]))
    assert sizes.tolist() == [9, 1] and sizes.dtype.kind == "i"
    assert split_sizes(10, np.array([1.0, 0.001, 0.001])).tolist() == [8, 1, 1]  # the largest gives way
    assert split_sizes(10, np.array([0.001, 1.0, 0.001])).tolist() == [1, 8, 1]
    # the remainder goes to the largest fractions (2.9 -> 3), not the largest shares
    assert split_sizes(10, np.array([0.29, 0.71])).tolist() == [3, 7]
    assert split_sizes(10, np.array([0.57, 0.43])).tolist() == [6, 4]


def test_throughput_balancer_is_inert_when_off_or_alone():
    for balancer in (ThroughputBalancer(2, enabled=False), ThroughputBalancer(1, enabled=True)):
        assert not any(balancer.observe(np.array([0.1, 0.9][: balancer.world_size]), np.array([8, 8][: balancer.world_size]))
                       for _ in range(20))
        assert balancer.shares.tolist() == [1 / balancer.world_size] * balancer.world_size
    assert ThroughputBalancer(4, enabled=True).shares.tolist() == [0.25] * 4


def test_throughput_balancer_sums_its_window_and_waits_between_resplits():
    balancer = ThroughputBalancer(2, enabled=True)
    assert not balancer.observe(np.array([9.0, 0.1]), np.array([8, 8]))  # the warm-up is ignored
    # observations of 5 steps in all complete the first window: their sums, not the last one, decide
    assert not balancer.observe(np.array([0.1, 0.1]), np.array([8, 4]), steps=2)
    assert balancer.observe(np.array([0.1, 0.5]), np.array([8, 12]), steps=3)  # alone: 0.833 / 0.167
    assert balancer.shares[0] == pytest.approx(0.75)
    # later re-splits wait a whole REBALANCE_EVERY window, whatever the speeds do meanwhile
    assert not balancer.observe(np.array([0.3, 0.1]), np.array([8, 8]), steps=REBALANCE_EVERY - 1)
    assert balancer.observe(np.array([0.3, 0.1]), np.array([8, 8]), steps=1)
    assert balancer.shares[0] == pytest.approx(0.25)


def test_throughput_balancer_starts_over_when_the_participants_change_and_heals_exactly():
    """Live: a quorum of another size measures again from even shares; a healing peer takes over the
    state (as JSON values) and then re-splits exactly as the replica it healed from."""
    balancer = ThroughputBalancer(2, enabled=True)
    for _ in range(6):
        balancer.observe(np.array([0.1, 0.3]), np.array([8, 8]))
    assert balancer.shares[0] == pytest.approx(0.75)
    balancer.resize(2)  # the same number (a respawn replaced a replica): the shares stand
    assert balancer.shares[0] == pytest.approx(0.75)
    healed = ThroughputBalancer(2, enabled=True)
    healed.load(json.loads(json.dumps(balancer.state_dict())))
    feed = [(np.array([0.2, 0.2]), np.array([12, 4]))] * REBALANCE_EVERY
    assert [balancer.observe(*step) for step in feed] == [healed.observe(*step) for step in feed]
    assert healed.shares.tolist() == balancer.shares.tolist()
    balancer.resize(3)
    assert balancer.shares.tolist() == [1 / 3] * 3
    assert not balancer.observe(np.array([0.1, 0.2, 0.4]), np.array([8, 8, 8]))  # a warm-up again
    assert [balancer.observe(np.array([0.1, 0.2, 0.4]), np.array([8, 8, 8])) for _ in range(5)][-1]
    assert balancer.shares == pytest.approx(np.array([4, 2, 1]) / 7)


@settings(deadline=None, max_examples=50)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=60), st.data())
def test_half_precision_wire_keeps_the_tail_exact_and_rounds_the_head(values, data):
    """--compress fp16/bf16 on the live path: the gradients travel in half precision, the votes, counts
    and fingerprints behind them in float32, unrounded (a fingerprint < 2**24 is not an fp16 number)."""
    packed = torch.tensor(values + [float(2**24 - 1), 12345.0], dtype=torch.float32)
    count = data.draw(st.integers(0, len(values)))
    for dtype in (torch.float16, torch.bfloat16):
        original = packed.clone()
        wire = half_precision_wire(packed, count, dtype)
        assert [t.dtype for t in wire] == [dtype, torch.float32]
        assert wire[0].numel() + wire[1].numel() == packed.numel()
        for tensor in wire:  # what the collective does to each part, summing over two identical replicas
            tensor.mul_(2)
        restore_half_precision(wire, packed)
        assert torch.equal(packed[count:], original[count:] * 2)
        torch.testing.assert_close(packed[:count], (original[:count].to(dtype) * 2).float())
        packed = original


def _rounds(steps: int, most: int) -> list[int]:
    lengths = []
    while steps > 0:
        lengths.append(steps_this_round(steps, most))
        steps -= lengths[-1]
    return lengths


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 600))
def test_an_epoch_is_cut_into_as_few_rounds_as_every_k_steps_as_even_as_they_go(steps, most):
    lengths = _rounds(steps, most)
    assert sum(lengths) == steps
    assert len(lengths) == -(-steps // most)  # as many synchronisations as cutting every K steps: the same bytes
    assert max(lengths) <= most
    assert max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)  # the longer first


def test_a_short_epoch_no_longer_ends_with_a_round_of_one_step():
    assert _rounds(49, 24) == [17, 16, 16]  # fastnet's 49 steps an epoch at K = 24, once 24, 24, 1
    assert _rounds(500, 32) == [32] * 4 + [31] * 12
    assert _rounds(64, 32) == [32, 32]


def test_the_restart_path_keeps_a_period_across_the_exchanges_of_votes_inside_it():
    sync = Synchronizer(torch.nn.Linear(2, 2), SyncSettings(mode="local-sgd", every="24"), torch.device("cpu"))
    # No process group here: when the averaging is due is what this checks, so it only resets the count
    sync.distributed = True
    sync.average_replicas = lambda: setattr(sync, "_since_average", 0)
    averaged_after, round_starts = [], True
    for step in range(49):
        if round_starts or step % 5 == 0:  # a round starts after an averaging, and at each exchange of votes
            sync.begin_round(step, steps_left=49 - step)
        round_starts = sync.after_step(step, last_of_epoch=step == 48)
        if round_starts:
            averaged_after.append(step + 1)
    assert averaged_after == [17, 33, 49]
    live = Synchronizer(torch.nn.Linear(2, 2), SyncSettings(mode="local-sgd", every="24"), torch.device("cpu"),
                        live=True)
    live.begin_round(0, 49)
    assert live.round_steps == 17
    live.begin_round(17, 32)
    assert live.round_steps == 16
