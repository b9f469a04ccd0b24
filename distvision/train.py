"""The training loop, top to bottom: one function every worker runs.

Each worker holds a full replica of the model (Pattern Parallel Training, Dahl et al. 2008),
trains on its own slice of every global batch, and the gradients are combined every step
(parallel/sync.py). Started by parallel/launch.py on one machine or by torchrun on many.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from distvision.checkpoint import save_checkpoint
from distvision.config import TrainConfig
from distvision.data.augment import AugmentSettings
from distvision.data.batches import Preprocessing, load_batch
from distvision.data.prepare import default_cache_dir, ensure_prepared, open_prepared
from distvision.data.sharding import epoch_permutation, global_batches, rank_slice
from distvision.errors import UserError
from distvision.evaluate import EVAL_CHUNK, evaluate_split
from distvision.metrics import Progress, append_metrics, epoch_line, say, write_json_atomic
from distvision.models.registry import create, recipe_for
from distvision.parallel.sync import unwrap, wrap_for_sync
from distvision.precision import autocast, choose_precision
from distvision.recipes import Recipe, lr_multiplier


def resolve_recipe(config: TrainConfig) -> Recipe:
    """The model's recipe with the user's flags laid over it."""
    return recipe_for(config.model, config.recipe).with_overrides(
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay, label_smoothing=config.label_smoothing,
    ).with_settings(config.recipe_settings)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(requested)


def set_worker_threads() -> int:
    """Give each local worker its share of the cores: no oversubscription."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads


def init_distributed(device: torch.device, timeout_seconds: float) -> tuple[int, int]:
    """Join the process group torchrun's rendezvous set up (or run alone without one)."""
    if "RANK" not in os.environ:
        return 0, 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))
    return dist.get_rank(), dist.get_world_size()


def split_validation(train_count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train indices, validation indices) carved out of the training set."""
    order = np.random.default_rng([seed, 7919]).permutation(train_count)
    val_count = int(round(train_count * fraction))
    return np.sort(order[val_count:]), np.sort(order[:val_count])


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD with Caffe-style parameter groups: biases and norms at bias_lr_mult, optionally undecayed."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for parameter in model.parameters():
        is_bias_like = parameter.ndim <= 1
        lr_mult = recipe.bias_lr_mult if is_bias_like else 1.0
        decay_mult = (1.0 if recipe.bias_decay else 0.0) if is_bias_like else getattr(parameter, "decay_mult", 1.0)
        groups.setdefault((lr_mult, decay_mult), []).append(parameter)
    param_groups = [
        {"params": params, "lr_mult": lr_mult, "weight_decay": recipe.weight_decay * decay_mult}
        for (lr_mult, decay_mult), params in groups.items()
    ]
    return torch.optim.SGD(param_groups, lr=recipe.lr, momentum=recipe.momentum,
                           nesterov=recipe.nesterov and recipe.momentum > 0)


def train(config: TrainConfig) -> dict | None:
    """Train with the given settings in this process (one rank); return the summary on rank 0."""
    wall_started = time.time()
    device = pick_device(config.device)
    threads = set_worker_threads() if device.type == "cpu" else torch.get_num_threads()
    rank, world_size = init_distributed(device, config.collective_timeout)
    recipe = resolve_recipe(config)
    if recipe.batch_size < world_size:
        raise UserError(f"the global batch ({recipe.batch_size}) is smaller than the worker count ({world_size})")
    run_dir = Path(config.out)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()

    # Data: every rank opens the same prepared, memory-mapped arrays (built once, under a lock).
    prepared = open_prepared(ensure_prepared(Path(config.data), config.image_size, cache_dir))
    train_indices, val_indices = split_validation(len(prepared.train_images), config.val_fraction, config.seed)
    preprocess = Preprocessing.build(
        recipe.preprocessing, prepared.manifest["mean"], prepared.manifest["std"], prepared.mean_image
    ).to(device)
    augment = AugmentSettings(recipe.translate, recipe.flip, recipe.cutout)

    # Model: the same seed everywhere gives identical replicas (DDP also broadcasts rank 0's).
    torch.manual_seed(config.seed)
    model = create(config.model, num_classes=len(prepared.classes), image_size=config.image_size)
    model = model.to(device, memory_format=torch.channels_last)
    local_batch = -(-recipe.batch_size // world_size)
    precision, precision_how = choose_precision(
        config.precision, model, config.model, local_batch, config.image_size, device, cache_dir
    )
    say(f"distvision: {config.model} on {world_size} worker(s) x {threads} thread(s), {device.type}, "
        f"{precision} ({precision_how}), global batch {recipe.batch_size}, {recipe.epochs} epochs, "
        f"{len(train_indices)} training images")
    if prepared.manifest["skipped_files"]:
        say(f"distvision: skipped {len(prepared.manifest['skipped_files'])} unreadable file(s), "
            f"listed in {prepared.path / 'manifest.json'}")
    model = wrap_for_sync(model, config.sync, device)
    optimizer = make_optimizer(model, recipe)

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    total_steps = recipe.epochs * len(global_batches(train_indices, recipe.batch_size, world_size))
    step = 0
    train_seconds = 0.0
    for epoch in range(recipe.epochs):
        # The epoch's global batches, identical on every rank; this rank trains on its slice of each.
        order = train_indices[epoch_permutation(config.seed, epoch, len(train_indices))]
        batches = global_batches(order, recipe.batch_size, world_size)
        progress = Progress(len(batches), f"epoch {epoch + 1}/{recipe.epochs}")
        loss_sum = torch.zeros(2, dtype=torch.float64)  # summed loss, samples: this rank
        epoch_started = time.perf_counter()
        model.train()
        for batch in batches:
            local = rank_slice(batch, rank, world_size)
            x = load_batch(prepared.train_images, local, preprocess, device, augment, config.seed, epoch)
            y = torch.from_numpy(prepared.train_labels[local]).to(device)
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * group["lr_mult"] * lr_multiplier(recipe.schedule, step / total_steps)
            with autocast(precision, device):
                logits = model(x)
            loss = nn.functional.cross_entropy(
                logits.float(), y, reduction="sum", label_smoothing=recipe.label_smoothing
            )
            # DDP averages over ranks; scaling by world/len(batch) makes that the mean over the
            # global batch even when ranks hold unequal slices.
            (loss * (world_size / len(batch))).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            local_loss = loss.item()
            loss_sum += torch.tensor([local_loss, len(local)], dtype=torch.float64)
            step += 1
            progress.update(local_loss / len(local))
        progress.close()
        epoch_seconds = time.perf_counter() - epoch_started
        train_seconds += epoch_seconds

        if dist.is_initialized():
            dist.all_reduce(loss_sum)
        replica = unwrap(model)
        test = evaluate_split(replica, prepared.test_images, prepared.test_labels, preprocess, precision, device)
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum[0].item() / loss_sum[1].item(),
            "test_loss": test.loss,
            "test_accuracy": test.accuracy,
            "images_per_second": loss_sum[1].item() / epoch_seconds,
            "epoch_seconds": epoch_seconds,
            "eval_seconds": time.perf_counter() - epoch_started - epoch_seconds,
            "world_size": world_size,
            "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_mult"],
        }
        if len(val_indices):
            val = evaluate_split(replica, prepared.train_images, prepared.train_labels, preprocess, precision,
                                 device, indices=val_indices)
            record.update(val_loss=val.loss, val_accuracy=val.accuracy)
        history.append(record)
        if rank == 0:
            append_metrics(run_dir, record)
            say(epoch_line(record))

    # Final evaluation with the recipe's test-time settings; the checkpoint holds exactly these weights.
    replica = unwrap(model)
    final = evaluate_split(replica, prepared.test_images, prepared.test_labels, preprocess, precision, device,
                           recipe.test_time_flip)
    summary = None
    if rank == 0:
        state = dict(replica.state_dict())
        state.update({"preprocess.mean": preprocess.mean, "preprocess.scale": preprocess.scale})
        save_checkpoint(run_dir / "checkpoint", state, {
            "model": config.model, "classes": prepared.classes, "image_size": config.image_size,
            "preprocessing": recipe.preprocessing, "precision": precision,
            "test_time_flip": recipe.test_time_flip, "eval_chunk": EVAL_CHUNK,
            "test_accuracy": final.accuracy, "epochs": recipe.epochs,
        })
        steady = history[1:] or history
        summary = {
            "model": config.model,
            "recipe_name": config.recipe,
            "recipe": recipe.to_dict(),
            "precision": precision,
            "precision_choice": precision_how,
            "epochs": recipe.epochs,
            "world_size": world_size,
            "threads_per_worker": threads,
            "device": device.type,
            "global_batch_size": recipe.batch_size,
            "train_count": len(train_indices),
            "val_count": len(val_indices),
            "test_accuracy": final.accuracy,
            "test_loss": final.loss,
            "best_test_accuracy": max([r["test_accuracy"] for r in history] + [final.accuracy]),
            "val_accuracy": history[-1].get("val_accuracy"),
            "images_per_second": sum(r["images_per_second"] * r["epoch_seconds"] for r in steady)
            / sum(r["epoch_seconds"] for r in steady),
            "train_seconds": train_seconds,
            "wall_seconds": time.time() - wall_started,
            "stop_reason": "completed all epochs",
            "skipped_files": prepared.manifest["skipped_files"],
            "data": str(prepared.manifest["source"]),
            "prepared_data": str(prepared.path),
            "config": config.to_dict(),
        }
        write_json_atomic(run_dir / "summary.json", summary)
        say(f"distvision: test accuracy {final.accuracy:.4f} after {recipe.epochs} epochs, "
            f"{summary['images_per_second']:.0f} img/s, {summary['wall_seconds']:.0f}s wall; outputs in {run_dir}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return summary


def train_worker(payload: dict) -> dict | None:
    """Worker entry for the launcher: settings arrive as a plain dict (picklable under spawn)."""
    return train(TrainConfig(**payload))
