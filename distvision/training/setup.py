"""Everything a worker builds once before its first step: device, process group, data, model with its
tricks, optimizer, synchroniser and the loop's components, gathered in one `Run`."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distvision.config import TrainConfig
from distvision.data.augment import AugmentSettings
from distvision.data.batches import BatchPrefetcher, Preprocessing, load_batch, resident
from distvision.data.prepare import Prepared, default_cache_dir, ensure_prepared, open_prepared
from distvision.errors import UserError
from distvision.metrics import say
from distvision.models.registry import create, recipe_for
from distvision.parallel.balance import ThroughputBalancer, scaled_lr, warmup_factor
from distvision.parallel.live_membership import LiveMembership, is_joining, replica_number
from distvision.parallel.membership import Seat, StaticMembership
from distvision.parallel.stopping import StopRules
from distvision.parallel.sync import Synchronizer, SyncSettings, outer_fragments, outer_optimizer, unwrap
from distvision.parallel.worker import init_distributed, pick_device, set_worker_threads
from distvision.precision import choose_precision
from distvision.recipes import Recipe, lr_multiplier, without_tricks
from distvision.training.batches import EpochBatches
from distvision.training.checkpoints import CheckpointManager, resume_settings
from distvision.training.exchange import StepExchange
from distvision.training.faults import FaultInjector, SampleAudit, StopSignal
from distvision.training.report import Reporter
from distvision.training.state import TrainState
from distvision.tricks import Lookahead, freeze_norm_scales, init_whitening, whitening_sample


def resolve_recipe(config: TrainConfig) -> Recipe:
    """The model's recipe with the user's flags laid over it, its lr scaled to the global batch if asked."""
    base = recipe_for(config.model, config.recipe)
    recipe = base.with_overrides(
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay, label_smoothing=config.label_smoothing,
    ).with_settings(config.recipe_settings)
    recipe = without_tricks(recipe, config.disable)
    if config.fragments > 1 and recipe.ema_every:
        raise UserError(f"--fragments {config.fragments} lets each fragment run free between its synchronisations, "
                        f"which the {config.model} recipe's lookahead would mix on each replica; add --no-ema")
    if config.lr_scaling == "none":
        return recipe
    base_batch = config.base_batch_size or base.batch_size
    return recipe.with_overrides(lr=scaled_lr(recipe.lr, recipe.batch_size, base_batch, config.lr_scaling))


def scheduled_lr(recipe: Recipe, warmup_epochs: float, progress_fraction: float) -> float:
    """The lr (before parameter groups' multipliers) at this fraction of the run: the recipe's lr, its
    schedule, and a linear warmup over the first warmup_epochs."""
    return recipe.lr * lr_multiplier(recipe.schedule, progress_fraction) * warmup_factor(
        progress_fraction * recipe.epochs, warmup_epochs)


def sync_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch-norm statistics over all workers' samples, through torch's SyncBatchNorm (CUDA only)."""
    if device.type != "cuda":
        raise UserError("--sync-bn needs CUDA: torch's SyncBatchNorm does not run on the CPU; "
                        "leave it off (per-worker statistics)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


# auto keeps the images on a GPU when they take at most this share of its free memory.
RESIDENT_SHARE = 0.25


def place_images(prepared: Prepared, setting: str, device: torch.device) -> Prepared:
    """--data-on-device: the training and test images copied once to the device (else memory-mapped)."""
    size = prepared.train_images.nbytes + prepared.test_images.nbytes
    on = setting == "on" or (setting == "auto" and device.type == "cuda"
                             and size <= RESIDENT_SHARE * torch.cuda.mem_get_info(device)[0])
    if not on:
        return prepared
    return replace(prepared, train_images=resident(prepared.train_images, device),
                   test_images=resident(prepared.test_images, device))


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


@dataclass
class Run:
    """One worker's training run: the settings, the data, the model, and the loop's components."""

    config: TrainConfig
    recipe: Recipe
    seat: Seat  # this round's rank and participants, read by every component
    membership: StaticMembership  # or LiveMembership: who takes part in each round, and whether it counts
    device: torch.device
    threads: int
    precision: str
    precision_choice: str  # how the precision was chosen (measured, cached, requested)
    prepared: Prepared
    train_indices: np.ndarray
    val_indices: np.ndarray
    preprocess: Preprocessing
    model: nn.Module  # as trained: wrapped by the synchroniser (DDP) when distributed
    optimizer: torch.optim.Optimizer
    lookahead: Lookahead | None
    sync: Synchronizer
    balancer: ThroughputBalancer
    batches: EpochBatches
    exchange: StepExchange
    checkpoints: CheckpointManager
    faults: FaultInjector
    audit: SampleAudit | None
    stop_signal: StopSignal
    stop_rules: StopRules
    reporter: Reporter
    state: TrainState

    @property
    def total_samples(self) -> int:
        return self.recipe.epochs * len(self.train_indices)

    def progress_fraction(self) -> float:
        """How far through the whole run the next step is, in [0, 1): the lr schedule's clock."""
        return (self.state.epoch * len(self.train_indices) + self.state.cursor) / self.total_samples

    def set_lr(self, progress_fraction: float) -> None:
        """The recipe's schedule and the warmup at this point of the run, for every parameter group."""
        lr = scheduled_lr(self.recipe, self.config.warmup_epochs, progress_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]

    def save_checkpoint(self) -> None:
        """A training checkpoint of the state as it is now (rank 0 writes it)."""
        self.checkpoints.save(self.state, unwrap(self.model), self.optimizer, self.lookahead, self.sync.outer,
                              self.sync.fragments)

    def resume_from_checkpoint(self) -> TrainState:
        """The newest checkpoint's state, loaded into model, optimizer, lookahead and DiLoCo's outer optimizer."""
        return self.checkpoints.resume(unwrap(self.model), self.optimizer, self.lookahead, self.sync.outer,
                                       self.sync.fragments)

    def base_lr(self) -> float:
        """The lr last set, before the groups' multipliers."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group["lr_mult"]


def build_model(config: TrainConfig, recipe: Recipe, prepared: Prepared, train_indices: np.ndarray,
                preprocess: Preprocessing, device: torch.device, rank: int) -> nn.Module:
    """The replica with the recipe's tricks; the same seed everywhere gives identical replicas (DDP
    also broadcasts rank 0's)."""
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
    if config.compile == "on":
        model.compile()  # compiled on its first forward; the module (and its state_dict names) stays
    return model


def build_run(config: TrainConfig, started: float) -> Run:
    """Set this worker up: join the group (or the live job), open the data, build and resume the model
    and the components.

    Under live membership (config.recovery == "live") the worker is a torchft replica, a group of one
    process that joins no torch process group. A replica respawned into a running job reads no
    checkpoint and leaves the run folder's log alone: it heals from a live peer at its first quorum.
    """
    live = config.recovery == "live"
    replica = replica_number() if live else None
    joining = live and is_joining()
    device = pick_device(config.device)
    threads = set_worker_threads(config.threads_per_worker) if device.type == "cpu" else torch.get_num_threads()
    if live and device.type == "cuda":  # a replica per GPU, as torchrun's local ranks have
        device = torch.device("cuda", replica % torch.cuda.device_count())
    rank, world_size = (0, 1) if live else init_distributed(device, config.collective_timeout)
    seat = Seat(rank, world_size)
    recipe = resolve_recipe(config)
    if recipe.batch_size < world_size:
        raise UserError(f"the global batch ({recipe.batch_size}) is smaller than the worker count ({world_size})")
    run_dir = Path(config.out)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()

    # Data: every rank opens the same prepared, memory-mapped arrays (built once, under a lock).
    prepared = open_prepared(ensure_prepared(Path(config.data), config.image_size, cache_dir))
    prepared = place_images(prepared, config.data_on_device, device)
    train_indices, val_indices = split_validation(len(prepared.train_images), config.val_fraction, config.seed)
    train_indices = training_subset(train_indices, config.train_fraction, config.seed)
    preprocess = Preprocessing.build(
        recipe.preprocessing, prepared.manifest["mean"], prepared.manifest["std"], prepared.mean_image
    ).to(device)

    model = build_model(config, recipe, prepared, train_indices, preprocess, device, rank)
    precision, precision_choice = choose_precision(
        config.precision, model, config.model, -(-recipe.batch_size // world_size), config.image_size,
        device, cache_dir,
    )
    optimizer = make_optimizer(model, recipe)
    lookahead = Lookahead(model, recipe.ema_every) if recipe.ema_every else None
    sync_settings = SyncSettings.from_config(config)
    outer, fragments = outer_optimizer(model, sync_settings), outer_fragments(model, sync_settings)

    # Resume: from the newest intact checkpoint, whatever world size wrote it.
    checkpoints = CheckpointManager(run_dir, seat, resume_settings(config, recipe), config.checkpoint_every)
    state = TrainState(world_size) if joining else checkpoints.resume(model, optimizer, lookahead, outer, fragments)
    workers = f"replica {replica} of a live job" if live else f"{world_size} worker(s)"
    say(f"distvision: {config.model} on {workers} x {threads} thread(s), {device.type}, "
        f"{precision} ({precision_choice}), global batch {recipe.batch_size}, {recipe.epochs} epochs, "
        f"{len(train_indices)} training images"
        + (f", resuming at step {state.step}" if checkpoints.resumed_event else ""))
    if prepared.manifest["skipped_files"]:
        say(f"distvision: skipped {len(prepared.manifest['skipped_files'])} unreadable file(s), "
            f"listed in {prepared.path / 'manifest.json'}")
    sync = Synchronizer(model, sync_settings, device, live=live, outer=outer, fragments=fragments)
    membership = live_membership(config, seat, run_dir) if live else StaticMembership(seat)
    balancer = ThroughputBalancer(world_size, config.balance == "throughput")
    if not live:  # live, the launcher holds the lock and the log is rewritten once the replica knows its peers
        checkpoints.open_run_dir(state)
    audit = SampleAudit(run_dir, replica if live else rank, seat) if config.audit_samples else None
    stop_signal = StopSignal()
    augment = AugmentSettings(recipe.translate, recipe.flip, recipe.cutout, recipe.alternating_flip)
    prefetcher = BatchPrefetcher(prepared.train_images, preprocess, device, augment, config.seed)
    if device.type == "cpu":  # on a GPU the hook runs in autograd's device thread, which must keep launching kernels
        sync.work_while_exchanging = prefetcher.load_ahead
    batches = EpochBatches(train_indices, prepared.train_labels, recipe.batch_size, config.seed, seat,
                           balancer, prefetcher, device)
    return Run(
        config=config, recipe=recipe, seat=seat, membership=membership, device=device, threads=threads,
        precision=precision, precision_choice=precision_choice, prepared=prepared,
        train_indices=train_indices, val_indices=val_indices, preprocess=preprocess, model=sync.model,
        optimizer=optimizer, lookahead=lookahead, sync=sync, balancer=balancer, batches=batches,
        exchange=StepExchange(seat, sync, membership), checkpoints=checkpoints,
        faults=FaultInjector(config, seat, unwrap(model)), audit=audit, stop_signal=stop_signal,
        stop_rules=StopRules.from_config(config, recipe.epochs),
        reporter=Reporter(config, run_dir, seat, started), state=state,
    )


def live_membership(config: TrainConfig, seat: Seat, run_dir: Path) -> LiveMembership:
    """This worker's torchft replica, joined to the job's Lighthouse, as the loop's membership."""
    from distvision.parallel.healing import load_secret
    from distvision.parallel.live import LIGHTHOUSE_ADDRESS_VARIABLE, LiveReplica, interface_towards

    lighthouse = config.lighthouse or os.environ.get(LIGHTHOUSE_ADDRESS_VARIABLE)
    if not lighthouse:
        raise UserError("--recovery live needs a torchft Lighthouse: give --lighthouse HOST:PORT")
    replica = LiveReplica(lighthouse, f"distvision{replica_number()}", timeout=config.collective_timeout,
                          quorum_timeout=max(config.collective_timeout, config.join_timeout),
                          secret=load_secret(config.secret_file), bind_host=config.bind or interface_towards(lighthouse))
    return LiveMembership(replica, seat, run_dir, config.quorum_every, config.lighthouse_grace)
