"""The training loop's components on their own, in one process: state, batches and the cursor, the step
exchange, faults, checkpoints and the TensorBoard report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distvision.config import TrainConfig
from distvision.data.augment import AugmentSettings
from distvision.data.batches import BatchPrefetcher, Preprocessing
from distvision.errors import UserError
from distvision.evaluate import EvalResult
from distvision.parallel.balance import ThroughputBalancer
from distvision.parallel.membership import Seat
from distvision.parallel.sync import Synchronizer, SyncSettings
from distvision.training.batches import EpochBatches
from distvision.training.checkpoints import CheckpointManager, check_same_settings, resume_settings
from distvision.training.exchange import StepExchange
from distvision.training.faults import FaultInjector
from distvision.training.report import Reporter
from distvision.training.setup import resolve_recipe, scheduled_lr
from distvision.training.state import TrainState


def epoch_batches(train_indices: np.ndarray, batch_size: int, rank: int, world_size: int,
                  images: np.ndarray | None = None) -> EpochBatches:
    images = np.zeros((int(train_indices.max()) + 1, 4, 4, 3), np.uint8) if images is None else images
    preprocess = Preprocessing.build("standardize", [0.5] * 3, [0.25] * 3, np.zeros((4, 4, 3)))
    prefetcher = BatchPrefetcher(images, preprocess, torch.device("cpu"), AugmentSettings(), seed=0)
    labels = np.arange(len(images)) % 7
    return EpochBatches(train_indices, labels, batch_size, seed=3, seat=Seat(rank, world_size),
                        balancer=ThroughputBalancer(world_size, enabled=False), prefetcher=prefetcher,
                        device=torch.device("cpu"))


# -- the cursor: every sample exactly once per epoch, whatever the world size does mid-epoch --------------
@settings(max_examples=40, deadline=None)
@given(sample_count=st.integers(1, 200), batch_size=st.integers(1, 40), epoch=st.integers(0, 3),
       attempts=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 12)), min_size=1, max_size=4))
def test_every_sample_once_per_epoch_across_resizes(sample_count, batch_size, epoch, attempts):
    """Attempts of (world size, steps before the next membership change); the last runs to the end."""
    train_indices = np.sort(np.random.default_rng(sample_count).choice(10 * sample_count, sample_count,
                                                                      replace=False))
    seen, cursor = [], 0
    for number, (world_size, steps) in enumerate(attempts):
        world_size = min(world_size, batch_size)
        ranks = [epoch_batches(train_indices, batch_size, rank, world_size) for rank in range(world_size)]
        remaining = ranks[0].remaining(epoch, cursor)
        if number < len(attempts) - 1:
            remaining = remaining[:steps]
        for batch in remaining:
            shares = [r.share(batch) for r in ranks]
            if sample_count - cursor >= world_size:  # (a resize can leave a tail too small for every rank)
                assert all(len(share) > 0 for share in shares)  # no rank idles on an empty slice
            assert np.array_equal(np.concatenate(shares), batch)
            seen.extend(batch.tolist())
            cursor += len(batch)
    assert sorted(seen) == train_indices.tolist()
    assert cursor == sample_count


def test_loaded_batches_are_the_shares_with_their_labels():
    train_indices = np.arange(0, 60, 2)
    images = np.arange(60, dtype=np.uint8).reshape(60, 1, 1, 1).repeat(4, 1).repeat(4, 2).repeat(3, 3)
    source = epoch_batches(train_indices, 8, rank=1, world_size=3, images=images)
    batches = source.remaining(epoch=1, cursor=8)
    loaded = list(source.load(1, batches))
    assert [b.index for b in loaded] == list(range(len(batches))) and loaded[-1].last
    assert not any(b.last for b in loaded[:-1])
    for step in loaded:
        assert np.array_equal(step.local_indices, source.share(step.global_indices))
        assert step.labels.tolist() == (step.local_indices % 7).tolist()
        # each input image is its sample's own pixels (value = index), standardised
        pixels = step.inputs[:, 0, 0, 0] / (1 / (0.25 * 255)) + 0.5 * 255
        assert torch.allclose(pixels, torch.tensor(step.local_indices, dtype=torch.float32), atol=1e-3)


# -- the state -------------------------------------------------------------------------------------------
def test_state_round_trips_through_a_checkpoint_at_another_world_size():
    state = TrainState(world_size=2)
    state.advance(100)
    state.add_loss(230.0, 100)
    state.finish_epoch({"epoch": 1, "test_accuracy": 0.5})
    state.log.append({"event": "restart", "epoch": 2})
    state.advance(64)
    saved = json.loads(json.dumps(state.state_dict()))
    assert "_segment_started" not in saved
    restored = TrainState.from_state_dict(saved, world_size=3)
    assert (restored.epoch, restored.cursor, restored.step, restored.world_size) == (1, 64, 2, 3)
    assert restored.history() == [{"epoch": 1, "test_accuracy": 0.5}]  # events are not epochs


def test_the_training_clock_counts_only_open_segments():
    state = TrainState(world_size=1)
    assert state.elapsed() == 0.0
    state.start_segment()
    state.close_segment()
    closed = state.train_seconds
    assert closed > 0 and state.epoch_seconds == closed
    state.close_segment()  # closing twice adds nothing
    assert state.train_seconds == closed and state.elapsed() == closed


# -- the step exchange -----------------------------------------------------------------------------------
def test_exchange_packs_by_name_and_a_nan_is_a_divergence_vote():
    sync = Synchronizer(torch.nn.Linear(2, 2), SyncSettings(), torch.device("cpu"))
    exchange = StepExchange(Seat(0, 1), sync)
    exchange.add(3.0, 10, 0.25)
    exchange.add(float("nan"), 10, 0.5)
    assert exchange.due(in_sync=True, last_of_epoch=False)  # one process: every step
    result = exchange.exchange(stop=True, checkpoint_due=True, time_up=False)
    assert (result.loss_sum, result.samples, result.steps) == (3.0, 20, 2)
    assert result.diverged_votes == 1 and result.stop_votes == 1 and result.checkpoint_due == 1
    assert result.compute_seconds.tolist() == [0.75] and result.samples_by_rank.tolist() == [20]
    assert result.stop_reason() == "diverged"  # a diverged replica is never checkpointed as a stop
    assert exchange.steps == 0 and exchange.loss_sum == 0.0  # nothing pending after an exchange
    exchange.add(1.0, 5, 0.1)
    assert exchange.exchange(stop=False, checkpoint_due=False, time_up=True).stop_reason() == "max_time"
    exchange.add(1.0, 5, 0.1)
    assert exchange.exchange(stop=False, checkpoint_due=False, time_up=False).stop_reason() is None


# -- faults ----------------------------------------------------------------------------------------------
def test_fault_injector_is_inert_without_debug_flags():
    faults = FaultInjector(TrainConfig(data="unused"), Seat(0, 1))
    loss = torch.tensor(2.0)
    assert faults.corrupt_loss(loss, 5) is loss
    assert not faults.wants_stop(10**9)
    assert faults.slowdown_seconds == 0.0


def test_fault_injector_hits_only_its_rank_and_step():
    config = TrainConfig(data="unused", debug_nan_at="1:3", debug_stop_at_step=7)
    on_rank_1, on_rank_0 = FaultInjector(config, Seat(1, 2)), FaultInjector(config, Seat(0, 2))
    assert math.isnan(on_rank_1.corrupt_loss(torch.tensor(2.0), 3).item())
    assert on_rank_1.corrupt_loss(torch.tensor(2.0), 4).item() == 2.0
    assert on_rank_0.corrupt_loss(torch.tensor(2.0), 3).item() == 2.0
    assert on_rank_0.wants_stop(7) and not on_rank_0.wants_stop(6) and not on_rank_1.wants_stop(7)


# -- checkpoints -----------------------------------------------------------------------------------------
def test_checkpoint_manager_resumes_the_newest_and_refuses_other_settings(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    settings_ = {"model": "mlp", "global_batch_size": 16, "seed": 0, "epochs": 2}
    manager = CheckpointManager(tmp_path, Seat(0, 2), settings=settings_, every_seconds=3600)
    fresh = manager.resume(model, optimizer, lookahead=None)
    assert fresh.step == 0 and manager.resumed_event is None
    manager.open_run_dir(fresh)
    assert not manager.due()
    state = TrainState(world_size=2, epoch=1, cursor=48, step=3)
    manager.save(state, model, optimizer, lookahead=None)

    other_model = torch.nn.Linear(3, 2)
    other_optimizer = torch.optim.SGD(other_model.parameters(), lr=0.1, momentum=0.9)
    resumed = CheckpointManager(tmp_path, Seat(0, 1), settings=settings_, every_seconds=3600)
    state = resumed.resume(other_model, other_optimizer, lookahead=None)
    assert (state.epoch, state.cursor, state.step, state.world_size) == (1, 48, 3, 1)
    assert resumed.resumed_event["event"] == "resume" and resumed.resumed_event["old_world_size"] == 2
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other_model.state_dict().values()))
    momentum = [other_optimizer.state[p]["momentum_buffer"] for p in other_model.parameters()]
    assert all(torch.equal(a, optimizer.state[p]["momentum_buffer"]) for a, p in zip(momentum, model.parameters()))

    changed = CheckpointManager(tmp_path, Seat(0, 1), settings=dict(settings_, seed=1), every_seconds=1)
    with pytest.raises(UserError, match="seed=0"):
        changed.resume(other_model, other_optimizer, lookahead=None)


# -- the report ------------------------------------------------------------------------------------------
def test_epoch_records_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reporter = Reporter(TrainConfig(data="unused"), tmp_path, Seat(0, 1), started=0.0)
    for epoch, accuracy in ((1, 0.25), (2, 0.5)):
        state = TrainState(world_size=1, epoch=epoch - 1, epoch_seconds=2.0, epoch_loss=30.0, epoch_samples=10)
        record = reporter.epoch_record(state, EvalResult(1.5, accuracy, 5, 10), None, lr=0.1, eval_seconds=0.5,
                                       workers={})
        reporter.epoch_done(record)
    reporter.close()
    assert [json.loads(line)["test_accuracy"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] \
        == [0.25, 0.5]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("test_accuracy")] == [(1, 0.25), (2, 0.5)]
    assert [e.value for e in events.Scalars("train_loss")] == [3.0, 3.0]


def test_a_resume_must_keep_the_run_settings_but_not_the_worker_count(tmp_path):
    config = TrainConfig(data="unused", model="mlp", lr=0.05, workers=2)
    settings = resume_settings(config, resolve_recipe(config))
    assert settings["recipe.lr"] == 0.05 and "workers" not in settings and "balance" not in settings
    check_same_settings(tmp_path, settings, resume_settings(TrainConfig(data="unused", model="mlp", lr=0.05,
                                                                        workers=1, balance="throughput"),
                                                            resolve_recipe(config)))
    for changed in ({"lr": 0.1}, {"sync": "local-sgd"}, {"precision": "bf16"}, {"train_fraction": 0.5}):
        other = TrainConfig(data="unused", model="mlp", **{"lr": 0.05, **changed})
        with pytest.raises(UserError, match="resume it with the same settings"):
            check_same_settings(tmp_path, settings, resume_settings(other, resolve_recipe(other)))
    # a checkpoint from before a setting was recorded is not refused for it
    check_same_settings(tmp_path, {"model": "mlp"}, settings)


def test_lr_scaling_to_the_global_batch_and_the_warmup_schedule():
    base = {"data": "unused", "model": "mlp", "lr": 0.1, "batch_size": 64, "base_batch_size": 16, "epochs": 4,
            "recipe_settings": ["schedule=[[0,1],[1,1]]"]}
    assert resolve_recipe(TrainConfig(**base, lr_scaling="sqrt")).lr == pytest.approx(0.2)
    assert resolve_recipe(TrainConfig(**base, lr_scaling="linear")).lr == pytest.approx(0.4)
    assert resolve_recipe(TrainConfig(**base)).lr == pytest.approx(0.1)  # --lr-scaling none
    recipe = resolve_recipe(TrainConfig(**base, lr_scaling="sqrt"))
    # two warmup epochs of four: half the lr after one epoch, all of it from the second on
    assert scheduled_lr(recipe, 2.0, 0.25) == pytest.approx(0.1, rel=1e-2)
    assert scheduled_lr(recipe, 2.0, 0.5) == pytest.approx(0.2)
    assert scheduled_lr(recipe, 2.0, 0.9) == pytest.approx(0.2)
    assert scheduled_lr(recipe, 0.0, 0.0) == pytest.approx(0.2)
