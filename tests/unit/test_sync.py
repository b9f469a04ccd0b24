"""Batch splitting, throughput balancing, the exchange interval and stopping rules, without processes
(synchronisation modes, balancing and stopping with real gloo processes: tests/e2e/test_sync.py)."""

from __future__ import annotations

import numpy as np
import pytest

from distvision.parallel.balance import (
    REBALANCE_EVERY,
    REBALANCE_THRESHOLD,
    ThroughputBalancer,
    split_sizes,
    weighted_slice,
)
from distvision.parallel.stopping import StopRules, stop_after_epoch
from distvision.parallel.sync import LOCAL_SGD_STATS_SECONDS, STATS_EVERY, stats_interval
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
