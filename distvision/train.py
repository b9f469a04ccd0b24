"""The training loop, top to bottom: one function every worker runs.

Each worker holds a full replica of the model (Pattern Parallel Training, Dahl et al. 2008),
trains on its own slice of every global batch, and the gradients are combined every step
(parallel/sync.py). Started by parallel/launch.py on one machine or by torchrun on many.

Progress is a world-size-independent position: (epoch, cursor), the cursor counting the samples
of the epoch's permutation already trained. Checkpoints carry it, so after a worker dies, a node
joins or leaves, or the user stops and resumes, the rest of the epoch is split over whoever is
there now and every sample is still seen exactly once per epoch.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from distvision.checkpoint import (
    load_latest_training_checkpoint,
    restore_optimizer,
    save_checkpoint,
    save_training_checkpoint,
)
from distvision.config import TrainConfig
from distvision.data.augment import AugmentSettings
from distvision.data.batches import BatchPrefetcher, Preprocessing, load_batch
from distvision.data.prepare import default_cache_dir, ensure_prepared, open_prepared
from distvision.data.sharding import epoch_permutation, global_batches, rank_slice
from distvision.errors import UserError
from distvision.evaluate import EVAL_CHUNK, evaluate_split
from distvision.fileio import hold_exclusive_lock, write_json_atomic
from distvision.metrics import Progress, append_metrics, epoch_line, rewrite_log, say
from distvision.models.registry import create, recipe_for
from distvision.parallel.balance import ThroughputBalancer, scaled_lr, warmup_factor, weighted_slice
from distvision.parallel.group import leave_process_group
from distvision.parallel.stopping import StopRules, stop_after_epoch, time_is_up
from distvision.parallel.sync import Synchronizer, SyncSettings, unwrap
from distvision.precision import autocast, choose_precision
from distvision.recipes import Recipe, lr_multiplier, without_tricks
from distvision.tricks import Lookahead, freeze_norm_scales, init_whitening, whitening_sample

HEARTBEAT_INTERVAL = 0.5  # seconds between rank 0's "still training" marks, for recovery timing
STOP_GRACE_SECONDS = 20.0  # after SIGTERM: time to finish the step and checkpoint before a hard exit


def resolve_recipe(config: TrainConfig) -> Recipe:
    """The model's recipe with the user's flags laid over it, its lr scaled to the global batch if asked."""
    base = recipe_for(config.model, config.recipe)
    recipe = base.with_overrides(
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay, label_smoothing=config.label_smoothing,
    ).with_settings(config.recipe_settings)
    recipe = without_tricks(recipe, config.disable)
    if config.lr_scaling == "none":
        return recipe
    base_batch = config.base_batch_size or base.batch_size
    return recipe.with_overrides(lr=scaled_lr(recipe.lr, recipe.batch_size, base_batch, config.lr_scaling))


def pick_device(requested: str, local_workers: int | None = None) -> torch.device:
    """This worker's device: its own GPU (by local rank) on CUDA, else the CPU.

    nccl cannot run two ranks on one GPU, so more local workers than GPUs is a user error.
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested != "cuda":
        return torch.device(requested)
    gpus = torch.cuda.device_count()
    local_workers = local_workers or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if gpus == 0:
        raise UserError("--device cuda: no CUDA GPU is visible here")
    if local_workers > gpus:
        raise UserError(f"{local_workers} workers on this machine need {local_workers} GPUs, it has {gpus}: "
                        f"use --workers {gpus} (or --device cpu)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def sync_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch-norm statistics over all workers' samples, through torch's SyncBatchNorm (CUDA only)."""
    if device.type != "cuda":
        raise UserError("--sync-bn needs CUDA: torch's SyncBatchNorm does not run on the CPU; "
                        "leave it off (per-worker statistics)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def set_worker_threads(threads: int | None = None) -> int:
    """Give each local worker its share of the cores (no oversubscription), or exactly `threads`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = threads or max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads


def init_distributed(device: torch.device, timeout_seconds: float) -> tuple[int, int]:
    """Join the process group torchrun's rendezvous set up (or run alone without one)."""
    if "RANK" not in os.environ:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # On CUDA, gradients go over nccl and the small CPU tensors (loss, votes, counts) over gloo.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))
    return dist.get_rank(), dist.get_world_size()


def split_validation(train_count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train indices, validation indices) carved out of the training set."""
    order = np.random.default_rng([seed, 7919]).permutation(train_count)
    val_count = round(train_count * fraction)
    return np.sort(order[val_count:]), np.sort(order[:val_count])


def training_subset(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded share of the training indices (sorted), the same on every rank; all of them at 1."""
    if fraction >= 1.0:
        return indices
    keep = max(1, round(len(indices) * fraction))
    return np.sort(np.random.default_rng([seed, 104729]).permutation(indices)[:keep])


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD with Caffe-style parameter groups: biases and norms at bias_lr_mult, optionally undecayed.

    Frozen parameters (whitening filters, frozen norm scales) are left out. A layer can set its own
    multipliers as `parameter.lr_mult` / `parameter.decay_mult`.
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        is_bias_like = parameter.ndim <= 1
        lr_mult = getattr(parameter, "lr_mult", recipe.bias_lr_mult if is_bias_like else 1.0)
        decay_mult = (1.0 if recipe.bias_decay else 0.0) if is_bias_like else getattr(parameter, "decay_mult", 1.0)
        groups.setdefault((lr_mult, decay_mult), []).append(parameter)

    def weight_decay(lr_mult: float) -> float:
        if not recipe.decoupled_weight_decay:
            return recipe.weight_decay
        # SGD multiplies its decay by the group's lr; dividing by the base lr leaves the decay per
        # step at weight_decay per 1024 samples times the schedule, whatever --lr is.
        return recipe.weight_decay * recipe.batch_size / 1024 / (recipe.lr * lr_mult)

    param_groups = [
        {"params": params, "lr_mult": lr_mult, "weight_decay": weight_decay(lr_mult) * decay_mult}
        for (lr_mult, decay_mult), params in groups.items()
    ]
    return torch.optim.SGD(param_groups, lr=recipe.lr, momentum=recipe.momentum,
                           nesterov=recipe.nesterov and recipe.momentum > 0)


def parse_rank_setting(setting: str | None, off: float) -> tuple[int, float]:
    """A debug setting RANK:NUMBER as (rank, number); (-1, off) when not given."""
    if not setting:
        return -1, off
    rank, number = setting.split(":")
    return int(rank), float(number)


def communication_by_worker(sync: Synchronizer, epoch_seconds: float, rank: int, world_size: int,
                            data_seconds: float = 0.0) -> dict:
    """Each worker's compute, communication and data seconds and bytes this epoch (then reset): lists by rank.

    Compute is everything but communication, so it includes the data seconds (batch gathering and
    augmentation), which are also given on their own.
    """
    mine = torch.zeros(4 * world_size, dtype=torch.float64)
    communication = sync.stats.communication_seconds
    mine[rank] = max(epoch_seconds - communication, 0.0)
    mine[world_size + rank] = communication
    mine[2 * world_size + rank] = sync.stats.bytes_exchanged
    mine[3 * world_size + rank] = data_seconds
    if dist.is_initialized():
        dist.all_reduce(mine)
    sync.stats.communication_seconds, sync.stats.bytes_exchanged = 0.0, 0
    values = mine.view(4, world_size).tolist()
    return {"compute_seconds": [round(v, 3) for v in values[0]],
            "communication_seconds": [round(v, 3) for v in values[1]],
            "bytes_exchanged": [int(v) for v in values[2]],
            "data_seconds": [round(v, 3) for v in values[3]]}


def fresh_state(world_size: int) -> dict:
    """Where a new run starts. Everything here is independent of the world size but the record of it."""
    return {"epoch": 0, "cursor": 0, "step": 0, "train_seconds": 0.0, "epoch_seconds": 0.0,
            "epoch_loss": 0.0, "epoch_samples": 0, "log": [], "world_size": world_size}


class StopSignal:
    """Remembers SIGTERM/SIGINT so the loop can stop at a step boundary with a checkpoint.

    Installed only around the training loop: anywhere else a signal ends the process at once. A
    worker that cannot reach a step boundary (stuck in a collective with a dead peer) still exits
    after STOP_GRACE_SECONDS, so the agent's restart never waits on it.
    """

    def __init__(self):
        self.requested = False
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._handle)

    def _handle(self, number, frame):
        if not self.requested:
            watchdog = threading.Timer(STOP_GRACE_SECONDS, os._exit, args=(128 + number,))
            watchdog.daemon = True
            watchdog.start()
        self.requested = True


def agree_on_resume(run_dir: Path, rank: int) -> tuple[dict, dict, dict] | None:
    """Every rank loads the checkpoint rank 0 picked (the newest intact one), or none."""
    loaded = load_latest_training_checkpoint(run_dir, warn=say) if rank == 0 else None
    choice = [loaded[2]["step"] if loaded else None]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None
    if rank != 0:
        loaded = load_latest_training_checkpoint(run_dir, warn=lambda message: None)
        if loaded is None or loaded[2]["step"] != choice[0]:
            raise UserError(f"rank {rank} cannot read checkpoint step {choice[0]} in {run_dir}: "
                            "--out must be on a file system every node shares")
    return loaded


def resume_state(run_dir: Path, rank: int, world_size: int, settings: dict, job_id: str,
                 model: nn.Module, optimizer: torch.optim.Optimizer,
                 lookahead: Lookahead | None) -> tuple[dict, dict | None]:
    """Load the newest checkpoint into model and optimizer; return (state, the event to log) or a fresh start.

    The same job id (torchrun's rendezvous id) means the agent restarted us after a failure or a
    membership change ("restart"); another id means a user resumed a stopped run ("resume").
    """
    loaded = agree_on_resume(run_dir, rank)
    if not loaded:
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
            return fresh_state(world_size), None
        # Restarted before the first checkpoint: everything so far is redone, and the log says so.
        event = {"event": "restart", "old_world_size": None, "new_world_size": world_size, "step": 0,
                 "epoch": 1, "cursor": 0, "from_scratch": True}
        heartbeat = read_heartbeat(run_dir)
        if heartbeat:
            event["seconds_lost"] = round(heartbeat["train_seconds"], 3)
            event["last_alive"] = heartbeat["time"]
        return fresh_state(world_size), event
    weights, optimizer_tensors, saved = loaded
    averages = {name: weights.pop(name) for name in list(weights) if name.startswith("lookahead.")}
    for key, expected in settings.items():
        if saved["settings"][key] != expected:
            raise UserError(f"{run_dir} holds a run with {key}={saved['settings'][key]!r}, not {expected!r}: "
                            "resume it with the same settings or choose another --out")
    model.load_state_dict(weights)
    restore_optimizer(optimizer, optimizer_tensors, saved)
    if lookahead:
        lookahead.load(averages, model)
    state = {key: saved[key] for key in fresh_state(world_size)}
    event = {"event": "restart" if job_id and saved.get("job_id") == job_id else "resume",
             "old_world_size": saved["world_size"], "new_world_size": world_size,
             "step": saved["step"], "epoch": saved["epoch"] + 1, "cursor": saved["cursor"]}
    heartbeat = read_heartbeat(run_dir)
    if heartbeat and heartbeat["step"] >= saved["step"]:
        event["seconds_lost"] = round(max(0.0, heartbeat["train_seconds"] - saved["train_seconds"]), 3)
        event["last_alive"] = heartbeat["time"]
    state["world_size"] = world_size
    return state, event


def train(config: TrainConfig) -> dict | None:
    """Train with the given settings in this process (one rank); return the summary on rank 0."""
    wall_started = time.time()
    device = pick_device(config.device)
    threads = set_worker_threads(config.threads_per_worker) if device.type == "cpu" else torch.get_num_threads()
    rank, world_size = init_distributed(device, config.collective_timeout)
    recipe = resolve_recipe(config)
    if recipe.batch_size < world_size:
        raise UserError(f"the global batch ({recipe.batch_size}) is smaller than the worker count ({world_size})")
    run_dir = Path(config.out)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()

    # Data: every rank opens the same prepared, memory-mapped arrays (built once, under a lock).
    prepared = open_prepared(ensure_prepared(Path(config.data), config.image_size, cache_dir))
    train_indices, val_indices = split_validation(len(prepared.train_images), config.val_fraction, config.seed)
    train_indices = training_subset(train_indices, config.train_fraction, config.seed)
    preprocess = Preprocessing.build(
        recipe.preprocessing, prepared.manifest["mean"], prepared.manifest["std"], prepared.mean_image
    ).to(device)
    augment = AugmentSettings(recipe.translate, recipe.flip, recipe.cutout, recipe.alternating_flip)

    # Model: the same seed everywhere gives identical replicas (DDP also broadcasts rank 0's).
    torch.manual_seed(config.seed)
    model = create(config.model, num_classes=len(prepared.classes), image_size=config.image_size)
    model = model.to(device, memory_format=torch.channels_last)
    if recipe.frozen_norm_scale:
        freeze_norm_scales(model)
    if recipe.whiten:  # from training images only (never the validation split), computed once, broadcast
        sample = whitening_sample(train_indices)
        init_whitening(model, load_batch(prepared.train_images, sample, preprocess, device), rank)
    if config.sync_bn:
        model = sync_batch_norm(model, device)
    precision, precision_how = choose_precision(
        config.precision, model, config.model, -(-recipe.batch_size // world_size), config.image_size,
        device, cache_dir,
    )
    optimizer = make_optimizer(model, recipe)
    lookahead = Lookahead(model, recipe.ema_every) if recipe.ema_every else None

    # Resume: from the newest intact checkpoint, whatever world size wrote it.
    settings = {"model": config.model, "global_batch_size": recipe.batch_size, "seed": config.seed,
                "epochs": recipe.epochs}
    job_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    state, resumed_event = resume_state(run_dir, rank, world_size, settings, job_id, model, optimizer, lookahead)
    say(f"distvision: {config.model} on {world_size} worker(s) x {threads} thread(s), {device.type}, "
        f"{precision} ({precision_how}), global batch {recipe.batch_size}, {recipe.epochs} epochs, "
        f"{len(train_indices)} training images" + (f", resuming at step {state['step']}" if resumed_event else ""))
    if prepared.manifest["skipped_files"]:
        say(f"distvision: skipped {len(prepared.manifest['skipped_files'])} unreadable file(s), "
            f"listed in {prepared.path / 'manifest.json'}")
    sync = Synchronizer(model, SyncSettings(config.sync, config.sync_every, config.sync_warmup, config.compress,
                                            config.powersgd_rank), device)
    model = sync.model
    balancer = ThroughputBalancer(world_size, config.balance == "throughput")

    def my_share(batch: np.ndarray) -> np.ndarray:
        """This rank's slice of a global batch, as the balancer splits it now."""
        return weighted_slice(batch, rank, balancer.shares) if balancer.enabled else rank_slice(batch, rank, world_size)

    rules = StopRules(recipe.epochs, config.target_accuracy, config.patience, config.min_delta, config.monitor,
                      config.max_time)
    slow_rank, slow_factor = parse_rank_setting(config.debug_slowdown, 1.0)
    slowdown_seconds = 0.0  # --debug-slowdown: the extra compute time this step simulates
    nan_rank, nan_step = parse_rank_setting(config.debug_nan_at, -1)
    in_sync = True  # replicas identical (always so under allreduce; after each averaging under local SGD)

    def checkpoint_now() -> None:
        if rank == 0:
            weights = dict(unwrap(model).state_dict(), **(lookahead.state() if lookahead else {}))
            save_training_checkpoint(run_dir, weights, optimizer,
                                     dict(state, settings=settings, saved_at=time.time(), job_id=job_id))

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        run_lock = lock_run_dir(run_dir)  # noqa: F841 - held until this process exits
        rewrite_log(run_dir, state["log"])  # the log as of the checkpoint: nothing counted twice
    audit, attempt = open_audit(run_dir, rank) if config.audit_samples else (None, None)
    total_samples = recipe.epochs * len(train_indices)
    stop_signal = StopSignal()
    stop_reason = None
    prefetcher = BatchPrefetcher(prepared.train_images, preprocess, device, augment, config.seed)
    if device.type == "cpu":  # on a GPU the hook runs in autograd's device thread, which must keep launching kernels
        sync.work_while_exchanging = prefetcher.load_ahead
    last_checkpoint = last_heartbeat = time.time()
    last_test = None  # (step, result) of the newest per-epoch test evaluation in this attempt
    while state["epoch"] < recipe.epochs and stop_reason is None:
        epoch = state["epoch"]
        # The epoch's global batches from the cursor on, identical on every rank; this rank trains on
        # its slice of each.
        order = train_indices[epoch_permutation(config.seed, epoch, len(train_indices))]
        batches = global_batches(order[state["cursor"]:], recipe.batch_size, world_size)
        progress = Progress(len(batches), f"epoch {epoch + 1}/{recipe.epochs}")
        pending = np.zeros(5)  # this worker's loss sum, samples, compute seconds, non-finite losses, steps
        progress_steps = 0
        prefetcher.seconds = 0.0  # this worker's time gathering and augmenting batches this epoch (this attempt)
        segment_started = last_exchange = time.perf_counter()
        model.train()
        for batch_index, batch in enumerate(batches):
            step_started = time.perf_counter()
            communication_before = sync.stats.communication_seconds
            local = my_share(batch)
            if audit:
                audit.write(json.dumps({"attempt": attempt, "epoch": epoch, "step": state["step"],
                                        "world_size": world_size, "indices": local.tolist()}) + "\n")
            x = prefetcher.take(local, epoch)
            if batch_index + 1 < len(batches):  # loaded while this step's gradients are exchanged
                prefetcher.prefetch(my_share(batches[batch_index + 1]), epoch)
            y = torch.from_numpy(prepared.train_labels[local]).to(device)
            if rank == slow_rank:
                # A slower machine's extra time falls before the gradient exchange, while the other
                # workers compute; after the step's exchange it would only make them wait in turn.
                time.sleep(slowdown_seconds)
            progress_fraction = (epoch * len(train_indices) + state["cursor"]) / total_samples
            lr = recipe.lr * lr_multiplier(recipe.schedule, progress_fraction) * warmup_factor(
                progress_fraction * recipe.epochs, config.warmup_epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            with sync.step_context(state["step"]):
                with autocast(precision, device):
                    logits = model(x)
                loss = nn.functional.cross_entropy(
                    logits.float(), y, reduction="sum", label_smoothing=recipe.label_smoothing
                )
                if rank == nan_rank and state["step"] == nan_step:  # --debug-nan-at
                    loss = loss * float("nan")
                sync.backward(loss, len(local), len(batch), world_size, state["step"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            in_sync = sync.after_step(state["step"], batch_index == len(batches) - 1)
            if lookahead:
                lookahead.maybe_update(unwrap(model), state["step"] + 1, progress_fraction + len(batch) / total_samples)
            compute_seconds = (time.perf_counter() - step_started
                               - (sync.stats.communication_seconds - communication_before))
            if rank == slow_rank:  # the next step sleeps (factor - 1) x this step's own compute time
                slowdown_seconds = (slow_factor - 1) * (compute_seconds - slowdown_seconds)
            if config.debug_step_delay:
                time.sleep(config.debug_step_delay)

            local_loss = loss.item()
            pending += (local_loss if math.isfinite(local_loss) else 0.0, len(local), compute_seconds,
                        not math.isfinite(local_loss), 1)
            state["step"] += 1
            state["cursor"] += len(batch)
            now = time.time()
            steps_since_exchange = int(pending[4])
            if not sync.exchanges_stats(steps_since_exchange, in_sync, batch_index == len(batches) - 1):
                continue  # the losses and votes wait for the next exchange (paced by sync.pace_stats)

            # One small all-reduce: the global loss, decisions every rank must share, rank 0's seconds
            # since the last one (to pace them), and each rank's compute time and sample count since
            # the last one (for throughput balancing).
            elapsed = state["train_seconds"] + time.perf_counter() - segment_started
            shared = torch.zeros(7 + 2 * world_size, dtype=torch.float64)
            shared[:7] = torch.tensor([
                pending[0], pending[1],
                float(stop_signal.requested or (rank == 0 and config.debug_stop_at_step is not None
                                                and state["step"] >= config.debug_stop_at_step)),
                pending[3],
                float(rank == 0 and now - last_checkpoint >= config.checkpoint_every),
                float(rank == 0 and time_is_up(rules, elapsed)),
                time.perf_counter() - last_exchange if rank == 0 else 0.0,
            ])
            shared[7 + rank], shared[7 + world_size + rank] = pending[2], pending[1]
            pending[:] = 0
            sync.small_all_reduce(shared)
            last_exchange = time.perf_counter()
            global_loss, samples, stop_votes, diverged_votes, checkpoint_due, time_up, seconds = shared[:7].tolist()
            sync.pace_stats(seconds / steps_since_exchange)
            if balancer.observe(shared[7 : 7 + world_size].numpy(), shared[7 + world_size :].numpy(),
                                steps_since_exchange):
                say(f"distvision: batch shares re-split by measured speed: "
                    f"{', '.join(f'{share:.2f}' for share in balancer.shares)}")
            state["epoch_loss"] += global_loss
            state["epoch_samples"] += int(samples)
            progress.update(global_loss / samples, steps=batch_index + 1 - progress_steps)
            progress_steps = batch_index + 1
            if resumed_event:
                record_resume(run_dir, rank, state, resumed_event, now)
                resumed_event = None
            if rank == 0 and now - last_heartbeat >= HEARTBEAT_INTERVAL:
                elapsed = state["train_seconds"] + time.perf_counter() - segment_started
                write_heartbeat(run_dir, state["step"], elapsed)
                last_heartbeat = now
            if diverged_votes:
                stop_reason = "diverged"
                break
            if stop_votes:
                stop_reason = "stopped"
                break
            if time_up:
                stop_reason = "max_time"
                break
            if checkpoint_due and in_sync:  # local SGD: only averaged replicas are worth a checkpoint
                segment_seconds = time.perf_counter() - segment_started
                state["train_seconds"] += segment_seconds
                state["epoch_seconds"] += segment_seconds
                checkpoint_now()
                last_checkpoint = time.time()
                segment_started = time.perf_counter()
        progress.close()
        segment_seconds = time.perf_counter() - segment_started
        state["train_seconds"] += segment_seconds
        state["epoch_seconds"] += segment_seconds
        if stop_reason:
            if not in_sync and stop_reason != "diverged":
                sync.average_replicas()  # stopping between local-SGD averagings: keep the average
            break

        replica = unwrap(model)
        eval_started = time.perf_counter()
        test = evaluate_split(replica, prepared.test_images, prepared.test_labels, preprocess, precision, device)
        last_test = (state["step"], test)
        record = {
            "epoch": epoch + 1,
            "train_loss": state["epoch_loss"] / max(state["epoch_samples"], 1),
            "test_loss": test.loss,
            "test_accuracy": test.accuracy,
            "images_per_second": state["epoch_samples"] / state["epoch_seconds"],
            "epoch_seconds": state["epoch_seconds"],
            "world_size": world_size,
            "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_mult"],
        }
        if len(val_indices):
            val = evaluate_split(replica, prepared.train_images, prepared.train_labels, preprocess, precision,
                                 device, indices=val_indices)
            record.update(val_loss=val.loss, val_accuracy=val.accuracy)
        record["eval_seconds"] = time.perf_counter() - eval_started
        record.update(communication_by_worker(sync, state["epoch_seconds"], rank, world_size, prefetcher.seconds))
        state.update(epoch=epoch + 1, cursor=0, epoch_seconds=0.0, epoch_loss=0.0, epoch_samples=0)
        state["log"].append(record)
        checkpoint_now()  # before the line is written: a restart never logs an epoch twice
        last_checkpoint = time.time()
        if rank == 0:
            append_metrics(run_dir, record)
            say(epoch_line(record))
        stop_reason = stop_after_epoch(rules, [r for r in state["log"] if "event" not in r])
        if stop_reason == "max_epochs":
            stop_reason = None  # the loop's own condition ends the run

    if stop_reason == "stopped":
        checkpoint_now()
        say(f"distvision: stopped at step {state['step']} with a checkpoint; continue with --resume --out {run_dir}")
        leave_process_group()
        return None

    # Final evaluation with the recipe's test-time settings; the checkpoint holds exactly these weights.
    replica = unwrap(model)
    if lookahead:
        lookahead.finish(replica)  # the run's result is the average the lookahead kept
    # The last epoch's evaluation measured these very weights one plain view per image, unless
    # training went on after it or the lookahead's average replaced them.
    if last_test and last_test[0] == state["step"] and not lookahead:
        plain = last_test[1]
    else:
        plain = evaluate_split(replica, prepared.test_images, prepared.test_labels, preprocess, precision, device)
    test_time_augmented = recipe.test_time_flip or recipe.test_time_shift
    final = evaluate_split(replica, prepared.test_images, prepared.test_labels, preprocess, precision, device,
                           recipe.test_time_flip, recipe.test_time_shift) if test_time_augmented else plain
    summary = None
    if rank == 0:
        weights = dict(replica.state_dict())
        weights.update({"preprocess.mean": preprocess.mean, "preprocess.scale": preprocess.scale})
        save_checkpoint(run_dir / "checkpoint", weights, {
            "model": config.model, "classes": prepared.classes, "image_size": config.image_size,
            "preprocessing": recipe.preprocessing, "precision": precision,
            "test_time_flip": recipe.test_time_flip, "test_time_shift": recipe.test_time_shift,
            "eval_chunk": EVAL_CHUNK,
            "test_accuracy": final.accuracy, "epochs": recipe.epochs,
        })
        history = [r for r in state["log"] if "epoch" in r and "event" not in r]
        steady = history[1:] or history
        summary = {
            "model": config.model,
            "recipe_name": config.recipe,
            "recipe": recipe.to_dict(),
            "precision": precision,
            "precision_choice": precision_how,
            "epochs": len(history),
            "world_size": world_size,
            "threads_per_worker": threads,
            "device": device.type,
            "global_batch_size": recipe.batch_size,
            "train_count": len(train_indices),
            "val_count": len(val_indices),
            "test_accuracy": final.accuracy,
            "test_loss": final.loss,
            "test_accuracy_without_tta": plain.accuracy,  # the same weights, one plain view per image
            "best_test_accuracy": max([r["test_accuracy"] for r in history] + [final.accuracy]),
            "val_accuracy": history[-1].get("val_accuracy") if history else None,
            "images_per_second": sum(r["images_per_second"] * r["epoch_seconds"] for r in steady)
            / max(sum(r["epoch_seconds"] for r in steady), 1e-9),
            "train_seconds": state["train_seconds"],
            "wall_seconds": time.time() - wall_started,
            "stop_reason": stop_reason or "max_epochs",
            "stop_epoch": len(history),
            "stop_step": state["step"],
            "sync": {"mode": config.sync, "every": config.sync_every, "warmup": config.sync_warmup,
                     "compress": config.compress, "balance": config.balance},
            # Per worker and summed over epochs; seconds blocked in collectives include waiting for peers.
            "compute_seconds": [sum(r["compute_seconds"][i] for r in history) for i in range(world_size)]
            if all(len(r.get("compute_seconds", [])) == world_size for r in history) else None,
            "communication_seconds": [sum(r["communication_seconds"][i] for r in history)
                                      for i in range(world_size)]
            if all(len(r.get("communication_seconds", [])) == world_size for r in history) else None,
            "bytes_exchanged": sum(sum(r.get("bytes_exchanged", [])) for r in history),
            "batch_shares": balancer.shares.round(4).tolist(),
            "restarts": sum(1 for r in state["log"] if r.get("event") == "restart"),
            "skipped_files": prepared.manifest["skipped_files"],
            "data": str(prepared.manifest["source"]),
            "prepared_data": str(prepared.path),
            "config": config.to_dict(),
        }
        write_json_atomic(run_dir / "summary.json", summary)
        say(f"distvision: test accuracy {final.accuracy:.4f} after {len(history)} epochs, "
            f"{summary['images_per_second']:.0f} img/s, {summary['wall_seconds']:.0f}s wall; outputs in {run_dir}")
    leave_process_group()
    return summary


def lock_run_dir(run_dir: Path):
    """Hold an exclusive lock on the run folder, so two jobs can never write one run."""
    handle = hold_exclusive_lock(run_dir / "run.lock")  # kept open for the life of the process
    if handle is None:
        raise UserError(f"another job is writing {run_dir}; give this one its own --out")
    return handle


def write_heartbeat(run_dir: Path, step: int, train_seconds: float) -> None:
    """Rank 0's mark that training was alive at this moment (recovery time is measured from it)."""
    write_json_atomic(run_dir / "heartbeat.json", {"time": time.time(), "step": step,
                                                    "train_seconds": train_seconds}, durable=False)


def read_heartbeat(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "heartbeat.json").read_text())
    except (OSError, ValueError):
        return None


def record_resume(run_dir: Path, rank: int, state: dict, event: dict, now: float) -> None:
    """Log the restart or resume once the first step after it has trained."""
    last_alive = event.pop("last_alive", None)
    restarted = event["event"] == "restart" and last_alive is not None
    event["recovery_seconds"] = round(now - last_alive, 3) if restarted else None
    event["time"] = now
    state["log"].append(event)
    if rank == 0:
        append_metrics(run_dir, event)
        if restarted:
            say(f"distvision: recovered in {event['recovery_seconds']:.1f} s after a membership change "
                f"(world size {event['old_world_size'] or '?'} -> {event['new_world_size']}), resumed at step "
                f"{event['step']}, {event.get('seconds_lost', 0):.1f} s of work redone")


def open_audit(run_dir: Path, rank: int):
    """Per-rank log of the sample indices trained at each step (for coverage checks).

    Each attempt (start, restart, resume) gets rank 0's clock as its id, shared by all ranks, so a
    reader can tell a step redone after a restart from the attempt that was lost.
    """
    attempt = [time.time_ns()]
    if dist.is_initialized():
        dist.broadcast_object_list(attempt, src=0)
    folder = run_dir / "audit"
    folder.mkdir(parents=True, exist_ok=True)
    return open(folder / f"attempt{attempt[0]}-rank{rank}.jsonl", "a", buffering=1), attempt[0]
