"""The training loop, top to bottom: one function every worker runs, for both recovery modes.

Each worker holds a full replica of the model (Pattern Parallel Training, Dahl et al. 2008),
trains on its own slice of every global batch, and the replicas are combined every round
(parallel/sync.py). A round is the steps from one exchange to the next: on a fixed group (torchrun,
the restart path) until the exchange of losses and votes is due, gradients travelling inside DDP's
backward; under live membership one step (averaging gradients) or H local steps, ending with one
all-reduce of the payload and the votes that the membership commits, or discards and redoes.

The loop's concerns each live in one component, which decides when it acts: who takes part in a
round (the membership, parallel/membership.py and live_membership.py), where the run is
(TrainState), which samples this worker trains on (EpochBatches), the exchange of losses and votes
(StepExchange), checkpoints, resume and heartbeat (CheckpointManager), debug faults (FaultInjector),
and what the user sees (Reporter).
"""

from __future__ import annotations

import time

import numpy as np
from torch import nn

from distvision.config import TrainConfig
from distvision.evaluate import EVAL_CHUNK, EvalResult, evaluate_part, result_of
from distvision.metrics import Progress, say
from distvision.models.registry import recorded_name
from distvision.parallel.group import leave_process_group
from distvision.parallel.live_membership import LeftBehind
from distvision.parallel.membership import Rollback
from distvision.parallel.stopping import stop_after_epoch, time_is_up
from distvision.parallel.sync import unwrap
from distvision.precision import autocast
from distvision.training.report import communication_by_worker
from distvision.training.setup import Run, build_run, resolve_recipe

__all__ = ["resolve_recipe", "train"]


def train(config: TrainConfig) -> dict | None:
    """Train with the given settings in this process (one worker); return the summary where it writes it."""
    run = build_run(config, started=time.time())
    run.membership.start(run, config.join_timeout)
    stop_reason, last_test = None, None
    try:
        while run.state.epoch < run.recipe.epochs and stop_reason is None:
            stop_reason = train_epoch(run)
            if stop_reason or run.state.cursor < len(run.train_indices):
                continue  # stopping; or healed into a peer's next epoch, which it has already evaluated
            with run.membership.busy:
                last_test = (run.state.step, end_epoch(run))
            run.membership.epoch_ended()
            stop_reason = stop_after_epoch(run.stop_rules, run.state.history())
            if stop_reason == "max_epochs":
                stop_reason = None  # the loop's own condition ends the run
    except LeftBehind:
        run.membership.shutdown(run_ended=True)
        return None
    summary = finish(run, stop_reason, last_test)
    run.membership.shutdown(run_ended=stop_reason != "stopped")
    return summary


def train_epoch(run: Run) -> str | None:
    """Train rounds from the state's cursor to the epoch's end; return why every worker stops early, or None."""
    state, sync, model, optimizer, membership = run.state, run.sync, run.model, run.optimizer, run.membership
    epoch, epoch_size = state.epoch, len(run.train_indices)
    progress = Progress(len(run.batches.remaining(epoch, state.cursor)), f"epoch {epoch + 1}/{run.recipe.epochs}")
    in_sync, stop_reason = True, None
    run.batches.prefetcher.seconds = 0.0  # this epoch's (this attempt's) time gathering and augmenting
    state.start_segment()
    run.exchange.start()
    model.train()
    while stop_reason is None and state.epoch == epoch and state.cursor < epoch_size:
        membership.begin_round()  # live: a quorum when due (healing a replica that is behind), a new seat
        if state.epoch != epoch:
            break  # healed from a peer already past this epoch's end
        run.balancer.resize(run.seat.participants)
        remaining = run.batches.remaining(epoch, state.cursor)
        sync.begin_round(state.step, steps_left=len(remaining))
        before = (Rollback.take(unwrap(model), optimizer, state.cursor, state.step,
                                keep_weights=not sync.round_averages_gradients) if membership.live else None)
        shares = []
        with membership.busy:
            for batch in run.batches.load(epoch, remaining):
                step_started, communication_before = time.perf_counter(), sync.stats.communication_seconds
                shares.append((state.step, batch.local_indices, batch.global_indices))
                run.faults.before_exchange_of_gradients()
                progress_fraction = run.progress_fraction()
                run.set_lr(progress_fraction)
                with sync.step_context(state.step):
                    with autocast(run.precision, run.device):
                        logits = model(batch.inputs)
                    loss = nn.functional.cross_entropy(logits.float(), batch.labels, reduction="sum",
                                                       label_smoothing=run.recipe.label_smoothing)
                    loss = run.faults.corrupt_loss(loss, state.step)
                    sync.backward(loss, len(batch.local_indices), batch.global_size, run.seat.participants,
                                  state.step)
                if sync.steps_now(state.step):  # live gradient averaging steps once the round commits
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                in_sync = sync.after_step(state.step, batch.last)  # local SGD: True right after an averaging
                if run.lookahead and not membership.live:
                    run.lookahead.maybe_update(unwrap(model), state.step + 1,
                                               progress_fraction + batch.global_size / run.total_samples)
                compute_seconds = (time.perf_counter() - step_started
                                   - (sync.stats.communication_seconds - communication_before))
                run.faults.after_step(state.step, compute_seconds)
                run.exchange.add(loss.item(), len(batch.local_indices), compute_seconds)
                state.advance(batch.global_size)
                membership.stepped()
                if sync.launches_now(len(shares), epoch_size - state.cursor, run.recipe.batch_size):
                    run.exchange.launch(sync.round_payload(before, room=0))  # --overlap: the rest overlaps it
                if run.exchange.due(in_sync, batch.last):
                    break  # the round ends with the exchange (paced by the synchroniser)
            stop_reason, in_sync = end_round(run, before, shares, progress, in_sync)
    progress.close()
    state.close_segment()
    if stop_reason and not in_sync and stop_reason != "diverged":
        sync.average_replicas()  # stopping between local-SGD averagings: keep the average
    return stop_reason


def end_round(run: Run, before: Rollback | None, shares: list, progress: Progress,
              in_sync: bool) -> tuple[str | None, bool]:
    """The round's exchange: losses, votes and (live) the payload; apply it, or roll the round back.
    Returns why every worker stops now, if it does, and whether the replicas are identical."""
    state, membership = run.state, run.membership
    # A signal stops the whole job on a fixed group; a live replica leaves alone and the others go on
    # (the launcher stops a live job by signalling every replica).
    leave_alone = membership.live and run.stop_signal.requested
    shared = run.exchange.exchange(
        stop=(run.stop_signal.requested and not membership.live) or run.faults.wants_stop(state.step),
        checkpoint_due=run.checkpoints.due(),
        time_up=run.seat.rank == 0 and time_is_up(run.stop_rules, state.elapsed()),
        payload=run.sync.round_payload(before, run.exchange.room(), ends_epoch=state.cursor >= len(run.train_indices)),
        in_flight=(lambda: run.faults.strike("exchange", state.step)) if run.faults.phase_faults else None)
    if shared is None or not membership.agrees(shared.fingerprints):
        # not committed (a peer failed), or a replica's weights differed: whoever is there at the next
        # quorum redoes the round
        state.cursor, state.step = before.restore(unwrap(run.model), run.optimizer)
        membership.discarded()
        return None, True
    if shared.payload is not None:
        run.sync.apply(shared.payload, run.seat.participants, before, run.optimizer)
        in_sync = True
        # once at the round's end if it crossed a pull, the same on every replica
        if run.lookahead and run.lookahead.catch_up(unwrap(run.model), before.step, state.step,
                                                    run.progress_fraction()):
            run.sync.weights_moved()
    membership.committed(state.step)
    if run.audit:  # live: each committer records the whole batch too, which the committed sum holds
        for step, local, whole in shares:
            run.audit.record(state.epoch, step, local, attempt=membership.attempt(),
                             batch=whole if membership.live else None)
    if run.balancer.observe(shared.compute_seconds, shared.samples_by_rank, shared.steps):
        say(f"distvision: batch shares re-split by measured speed: "
            f"{', '.join(f'{share:.2f}' for share in run.balancer.shares)}")
    state.add_loss(shared.loss_sum, shared.samples)
    progress.update(shared.loss_sum / max(shared.samples, 1), steps=len(shares))
    run.checkpoints.after_exchange(state)
    stop_reason = shared.stop_reason() or ("stopped" if leave_alone else None)
    if stop_reason is None and shared.checkpoint_due and in_sync and state.cursor < len(run.train_indices):
        state.close_segment()  # local SGD: only averaged replicas are worth a checkpoint
        run.save_checkpoint()
        state.start_segment()
    return stop_reason, in_sync


def evaluate(run: Run, test_time_augmentation: bool = False, validation: bool = False) -> EvalResult:
    """The replica's loss and accuracy on the test split (or the validation split). Each participant
    evaluates its part and one all-reduce through the membership sums them; where a live peer fails
    meanwhile, this replica evaluates the others' parts itself (a chunk gives the same numbers whoever
    evaluates it, so every replica still records the same figures)."""
    images, labels = ((run.prepared.train_images, run.prepared.train_labels) if validation
                      else (run.prepared.test_images, run.prepared.test_labels))
    flip, shift = ((run.recipe.test_time_flip, run.recipe.test_time_shift) if test_time_augmentation
                   else (False, False))
    split = (unwrap(run.model), images, labels, run.preprocess, run.precision, run.device, flip, shift,
             run.val_indices if validation else None)
    rank, parts = run.seat.rank, run.seat.participants
    totals = evaluate_part(*split, rank, parts)
    run.faults.strike("eval", run.state.step)
    mine = totals.clone()
    if not run.membership.allreduce(totals):  # the sum is garbage: evaluate the others' parts too
        totals = mine + sum(evaluate_part(*split, part, parts) for part in range(parts) if part != rank)
    return result_of(totals)


def end_epoch(run: Run) -> EvalResult:
    """Evaluate, record and checkpoint the epoch just trained; return its test result."""
    state = run.state
    eval_started = time.perf_counter()
    test = evaluate(run)
    val = evaluate(run, validation=True) if len(run.val_indices) else None
    eval_seconds = time.perf_counter() - eval_started
    workers = communication_by_worker(run.sync, state.epoch_seconds, run.seat, run.membership.allreduce,
                                      run.batches.prefetcher.seconds)
    record = run.reporter.epoch_record(state, test, val, run.base_lr(), eval_seconds, workers)
    state.finish_epoch(record)
    run.save_checkpoint()  # before the line is written: a restart never logs an epoch twice
    run.reporter.epoch_done(record)
    return test


def finish(run: Run, stop_reason: str | None, last_test: tuple[int, EvalResult] | None) -> dict | None:
    """A stopped run leaves a checkpoint to resume; a finished one its final evaluation, model and summary."""
    state, recipe, config = run.state, run.recipe, run.config
    if run.seat.rank == 0 and run.membership.finished_without_us():
        return None  # a live replica respawned at the very end, whose peers have finished the run
    if stop_reason == "stopped":
        run.save_checkpoint()
        say(f"distvision: stopped at step {state.step} with a checkpoint; continue with --resume --out "
            f"{config.out}")
        run.reporter.close()
        leave_process_group()
        return None
    replica = unwrap(run.model)
    run.sync.settle()  # DiLoCo ending between synchronisations (fragments, a mix): the agreed weights
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
        "model": recorded_name(config.model), "classes": run.prepared.classes, "image_size": config.image_size,
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
        "overlapped_rounds": run.exchange.launches,
    })
    leave_process_group()
    return summary
