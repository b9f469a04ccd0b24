"""The training loop, top to bottom: one function every worker runs.

Each worker holds a full replica of the model (Pattern Parallel Training, Dahl et al. 2008),
trains on its own slice of every global batch, and the gradients are combined every step
(parallel/sync.py). Started by parallel/launch.py on one machine or by torchrun on many.

The loop's concerns each live in one component of distvision/training/, which decides when it
acts: where the run is (TrainState), which samples this rank trains on (EpochBatches), the small
all-reduce of losses and votes (StepExchange), checkpoints, resume and heartbeat
(CheckpointManager), debug faults (FaultInjector), and what the user sees (Reporter).
"""

from __future__ import annotations

import time

import numpy as np
from torch import nn

from distvision.config import TrainConfig
from distvision.evaluate import EVAL_CHUNK, EvalResult, evaluate_split
from distvision.metrics import Progress, say
from distvision.parallel.group import leave_process_group
from distvision.parallel.stopping import stop_after_epoch, time_is_up
from distvision.parallel.sync import unwrap
from distvision.precision import autocast
from distvision.training.report import communication_by_worker
from distvision.training.setup import Run, build_run, resolve_recipe

__all__ = ["resolve_recipe", "train"]


def train(config: TrainConfig) -> dict | None:
    """Train with the given settings in this process (one rank); return the summary on rank 0."""
    run = build_run(config, started=time.time())
    stop_reason, last_test = None, None
    while run.state.epoch < run.recipe.epochs and stop_reason is None:
        stop_reason = train_epoch(run)
        if stop_reason:
            break
        last_test = (run.state.step, end_epoch(run))
        stop_reason = stop_after_epoch(run.stop_rules, run.state.history())
        if stop_reason == "max_epochs":
            stop_reason = None  # the loop's own condition ends the run
    return finish(run, stop_reason, last_test)


def train_epoch(run: Run) -> str | None:
    """Train from the state's cursor to the epoch's end; return why every rank stops early, or None."""
    state, sync, model, optimizer = run.state, run.sync, run.model, run.optimizer
    batches = run.batches.remaining(state.epoch, state.cursor)
    progress = Progress(len(batches), f"epoch {state.epoch + 1}/{run.recipe.epochs}")
    progress_steps, in_sync, stop_reason = 0, True, None
    state.start_segment()
    run.exchange.start()
    model.train()
    for batch in run.batches.load(state.epoch, batches):
        step_started, communication_before = time.perf_counter(), sync.stats.communication_seconds
        if run.audit:
            run.audit.record(state.epoch, state.step, batch.local_indices)
        run.faults.before_exchange_of_gradients()
        progress_fraction = run.progress_fraction()
        run.set_lr(progress_fraction)
        with sync.step_context(state.step):
            with autocast(run.precision, run.device):
                logits = model(batch.inputs)
            loss = nn.functional.cross_entropy(logits.float(), batch.labels, reduction="sum",
                                               label_smoothing=run.recipe.label_smoothing)
            loss = run.faults.corrupt_loss(loss, state.step)
            sync.backward(loss, len(batch.local_indices), batch.global_size, run.world_size, state.step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        in_sync = sync.after_step(state.step, batch.last)  # local SGD: True right after an averaging
        if run.lookahead:
            run.lookahead.maybe_update(unwrap(model), state.step + 1,
                                       progress_fraction + batch.global_size / run.total_samples)
        compute_seconds = (time.perf_counter() - step_started
                           - (sync.stats.communication_seconds - communication_before))
        run.faults.after_step(compute_seconds)
        run.exchange.add(loss.item(), len(batch.local_indices), compute_seconds)
        state.advance(batch.global_size)
        if not run.exchange.due(in_sync, batch.last):
            continue  # the losses and votes wait for the next exchange (paced by the synchroniser)

        shared = run.exchange.exchange(
            stop=run.stop_signal.requested or run.faults.wants_stop(state.step),
            checkpoint_due=run.checkpoints.due(),
            time_up=run.rank == 0 and time_is_up(run.stop_rules, state.elapsed()))
        if run.balancer.observe(shared.compute_seconds, shared.samples_by_rank, shared.steps):
            say(f"distvision: batch shares re-split by measured speed: "
                f"{', '.join(f'{share:.2f}' for share in run.balancer.shares)}")
        state.add_loss(shared.loss_sum, shared.samples)
        progress.update(shared.loss_sum / shared.samples, steps=batch.index + 1 - progress_steps)
        progress_steps = batch.index + 1
        run.checkpoints.after_exchange(state)
        stop_reason = shared.stop_reason()
        if stop_reason:
            break
        if shared.checkpoint_due and in_sync:  # local SGD: only averaged replicas are worth a checkpoint
            state.close_segment()
            run.save_checkpoint()
            state.start_segment()
    progress.close()
    state.close_segment()
    if stop_reason and not in_sync and stop_reason != "diverged":
        sync.average_replicas()  # stopping between local-SGD averagings: keep the average
    return stop_reason


def evaluate(run: Run, test_time_augmentation: bool = False, validation: bool = False) -> EvalResult:
    """The replica's loss and accuracy on the test split (or the validation split), over all ranks."""
    images, labels = ((run.prepared.train_images, run.prepared.train_labels) if validation
                      else (run.prepared.test_images, run.prepared.test_labels))
    flip, shift = ((run.recipe.test_time_flip, run.recipe.test_time_shift) if test_time_augmentation
                   else (False, False))
    return evaluate_split(unwrap(run.model), images, labels, run.preprocess, run.precision, run.device,
                          flip, shift, indices=run.val_indices if validation else None)


def end_epoch(run: Run) -> EvalResult:
    """Evaluate, record and checkpoint the epoch just trained; return its test result."""
    state = run.state
    eval_started = time.perf_counter()
    test = evaluate(run)
    val = evaluate(run, validation=True) if len(run.val_indices) else None
    eval_seconds = time.perf_counter() - eval_started
    workers = communication_by_worker(run.sync, state.epoch_seconds, run.rank, run.world_size,
                                      run.batches.prefetcher.seconds)
    record = run.reporter.epoch_record(state, test, val, run.base_lr(), eval_seconds, workers)
    state.finish_epoch(record)
    run.save_checkpoint()  # before the line is written: a restart never logs an epoch twice
    run.reporter.epoch_done(record)
    return test


def finish(run: Run, stop_reason: str | None, last_test: tuple[int, EvalResult] | None) -> dict | None:
    """A stopped run leaves a checkpoint to resume; a finished one its final evaluation, model and summary."""
    state, recipe, config = run.state, run.recipe, run.config
    if stop_reason == "stopped":
        run.save_checkpoint()
        say(f"distvision: stopped at step {state.step} with a checkpoint; continue with --resume --out "
            f"{config.out}")
        run.reporter.close()
        leave_process_group()
        return None
    replica = unwrap(run.model)
    if run.lookahead:
        run.lookahead.finish(replica)  # the run's result is the average the lookahead kept
    # The last epoch's evaluation measured these very weights one plain view per image, unless
    # training went on after it or the lookahead's average replaced them.
    if last_test and last_test[0] == state.step and not run.lookahead:
        plain = last_test[1]
    else:
        plain = evaluate(run)
    final = evaluate(run, test_time_augmentation=True) if recipe.test_time_flip or recipe.test_time_shift else plain
    weights = dict(replica.state_dict())
    weights.update({"preprocess.mean": run.preprocess.mean, "preprocess.scale": run.preprocess.scale})
    run.checkpoints.save_model(weights, {
        "model": config.model, "classes": run.prepared.classes, "image_size": config.image_size,
        "preprocessing": recipe.preprocessing, "precision": run.precision,
        "test_time_flip": recipe.test_time_flip, "test_time_shift": recipe.test_time_shift,
        "eval_chunk": EVAL_CHUNK, "test_accuracy": final.accuracy, "epochs": recipe.epochs,
    })
    manifest = run.prepared.manifest
    summary = run.reporter.summary(state, recipe, final, plain, stop_reason, {
        "precision": run.precision, "precision_choice": run.precision_choice,
        "threads_per_worker": run.threads, "device": run.device.type,
        "train_count": len(run.train_indices), "val_count": len(run.val_indices),
        "batch_shares": run.balancer.shares.round(4).tolist(), "skipped_files": manifest["skipped_files"],
        "data": str(manifest["source"]), "prepared_data": str(run.prepared.path),
        "data_on_device": not isinstance(run.prepared.train_images, np.ndarray),
    })
    leave_process_group()
    return summary
