"""Synchronisation modes, batch balancing and stopping criteria, with real gloo processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import MLP_SETTINGS, MLP_TRICKS, run_cli, spawn_workers
from safetensors.torch import load_file

from distvision.models import create
from distvision.parallel.balance import (
    REBALANCE_EVERY,
    REBALANCE_THRESHOLD,
    ThroughputBalancer,
    split_sizes,
    weighted_slice,
)
from distvision.parallel.group import leave_process_group
from distvision.parallel.stopping import StopRules, stop_after_epoch
from distvision.parallel.sync import (
    LOCAL_SGD_STATS_SECONDS,
    STATS_EVERY,
    Synchronizer,
    SyncSettings,
    stats_interval,
    unwrap,
)
from distvision.train import STOP_GRACE_SECONDS

COMMON = MLP_SETTINGS  # the settings of the shared all-reduce run (conftest's mlp_run_two_workers)


@pytest.fixture(scope="module")
def data(mlp_data: Path) -> Path:
    return mlp_data


def _train(data: Path, out: Path, *extra: str) -> dict:
    result = run_cli(["train", "--data", str(data), "--out", str(out), *extra], out.parent / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def allreduce_run(mlp_run_two_workers: Path) -> tuple[Path, dict]:
    return mlp_run_two_workers, json.loads((mlp_run_two_workers / "summary.json").read_text())


def test_local_sgd_every_step_equals_allreduce(data: Path, allreduce_run, tmp_path: Path):
    local = _train(data, tmp_path / "local", "--workers", "2", "--sync", "local-sgd", "--sync-every", "1", *COMMON,
                   *MLP_TRICKS)  # the shared run's tricks too: averaging every step must still be all-reduce
    a = load_file(allreduce_run[0] / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "local" / "checkpoint" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    assert local["sync"]["mode"] == "local-sgd" and local["bytes_exchanged"] > 0


def test_local_sgd_exchanges_less_and_compression_is_counted(data: Path, allreduce_run, tmp_path: Path):
    dense = allreduce_run[1]
    local = _train(data, tmp_path / "local", "--workers", "2", "--sync", "local-sgd", "--sync-every", "4", *COMMON)
    # 72 images in batches of 16: 5 steps an epoch; averaging after 4 steps and at the epoch's end.
    assert local["bytes_exchanged"] < dense["bytes_exchanged"] / 2
    for summary in (dense, local):
        assert len(summary["communication_seconds"]) == 2 and len(summary["compute_seconds"]) == 2
    record = [json.loads(line) for line in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()][-1]
    assert len(record["bytes_exchanged"]) == 2 and record["compute_seconds"][0] > 0


def _replicas_after_averaging(rank: int, world_size: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    sync = Synchronizer(model, SyncSettings("local-sgd", every="3"), torch.device("cpu"))
    optimizer = torch.optim.SGD(sync.model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(100 + rank)  # every rank sees different data
    flags = []
    for step in range(6):
        x, y = torch.randn(5, 6, generator=generator), torch.randint(0, 3, (5,), generator=generator)
        with sync.step_context(step):
            loss = torch.nn.functional.cross_entropy(sync.model(x), y, reduction="sum")
            sync.backward(loss, 5, 5 * world_size, world_size, step)
        optimizer.step()
        optimizer.zero_grad()
        flags.append(sync.after_step(step, last_of_epoch=False))
        state = torch.cat([t.detach().flatten() for t in unwrap(sync.model).state_dict().values()
                           if t.is_floating_point()])
        gathered = [torch.zeros_like(state) for _ in range(world_size)]
        dist.all_gather(gathered, state)
        same = all(torch.equal(gathered[0], g) for g in gathered)
        flags.append(same)
    if rank == 0:
        Path(results).write_text(json.dumps(flags))
    leave_process_group(barrier=False)


def _gloo_checks(rank: int, world_size: int, folder: str) -> None:
    """Both spawned checks, one after the other, in one pair of processes (each start costs seconds)."""
    _replicas_after_averaging(rank, world_size, f"{folder}/init-averaging", f"{folder}/flags.json")
    _uneven_gradients(rank, world_size, f"{folder}/init-uneven", f"{folder}/grads.json")


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gloo")
    spawn_workers(_gloo_checks, (2, str(folder)))
    return folder


def test_local_sgd_replicas_are_identical_right_after_each_averaging(gloo_results: Path):
    flags = json.loads((gloo_results / "flags.json").read_text())
    averaged, identical = flags[0::2], flags[1::2]
    assert averaged == [False, False, True, False, False, True]
    assert identical == averaged  # identical exactly when just averaged (parameters and BN buffers)


def _uneven_gradients(rank: int, world_size: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    reference = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    reference.load_state_dict(model.state_dict())
    sync = Synchronizer(model, SyncSettings("allreduce"), torch.device("cpu"))
    generator = torch.Generator().manual_seed(7)
    x, y = torch.randn(12, 6, generator=generator), torch.randint(0, 3, (12,), generator=generator)
    batch = np.arange(12)
    local = weighted_slice(batch, rank, np.array([0.75, 0.25]))
    with sync.step_context(0):
        loss = torch.nn.functional.cross_entropy(sync.model(x[local]), y[local], reduction="sum")
        sync.backward(loss, len(local), len(batch), world_size, 0)
    torch.nn.functional.cross_entropy(reference(x), y).backward()  # one process, the whole batch
    ok = all(torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6)
             for p, q in zip(unwrap(sync.model).parameters(), reference.parameters()))
    if rank == 0:
        Path(results).write_text(json.dumps({"ok": ok, "sizes": [9, 3] if len(local) == 9 else None}))
    leave_process_group(barrier=False)


def test_uneven_worker_batches_give_the_whole_batch_gradient(gloo_results: Path):
    assert json.loads((gloo_results / "grads.json").read_text()) == {"ok": True, "sizes": [9, 3]}


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


def test_balance_throughput_with_a_slowed_worker(data: Path, tmp_path: Path):
    summary = _train(data, tmp_path / "balanced", "--workers", "2", "--balance", "throughput",
                     "--debug-slowdown", "1:3", *COMMON)
    assert summary["batch_shares"][0] > 0.6, summary["batch_shares"]  # the unslowed worker takes the larger share


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


# The compression hooks ride along on two of these runs and local SGD on a third: they must train
# and stop like the others.
@pytest.mark.parametrize("flags, reason", [
    (["--target-accuracy", "0.5", "--compress", "fp16"], "target_accuracy"),
    (["--patience", "1", "--min-delta", "1.0", "--compress", "powersgd"], "patience"),
    (["--max-time", "0.01", "--sync", "local-sgd", "--sync-every", "4"], "max_time"),
    (["--debug-nan-at", "1:3"], "diverged"),
])
def test_every_criterion_stops_all_workers_at_the_same_step(data: Path, tmp_path: Path, flags, reason):
    out = tmp_path / "run"
    summary = _train(data, out, "--workers", "2", "--audit-samples", *COMMON[:-6], "--epochs", "4",
                     "--batch-size", "16", "--lr", "0.05", *flags)
    assert summary["stop_reason"] == reason
    last_steps = []
    for log in sorted((out / "audit").glob("attempt*-rank*.jsonl")):
        last_steps.append(max(json.loads(line)["step"] for line in log.read_text().splitlines()))
    assert len(last_steps) == 2 and last_steps[0] == last_steps[1] == summary["stop_step"] - 1
    assert summary["stop_epoch"] < 4 or reason == "max_time"
    if "--compress" in flags:  # half-size (fp16) or low-rank (PowerSGD) gradients: fewer bytes than fp32
        steps, parameters = summary["stop_step"], sum(p.numel() for p in create("mlp", num_classes=3).parameters())
        assert 0 < summary["bytes_exchanged"] < 2 * steps * parameters * 4 * 0.55
