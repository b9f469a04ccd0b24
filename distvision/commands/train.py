"""`distvision train`: settle the run's data and folder, then run as a worker or launch the workers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

from distvision import __version__
from distvision.checkpoint import list_training_checkpoints, newest_checkpoint_settings
from distvision.config import TrainConfig, config_file_values, config_toml, write_config_file
from distvision.data.prepare import default_cache_dir, ensure_prepared
from distvision.errors import UserError
from distvision.parallel.launch import run_as_worker, start_workers, started_by_torchrun, stop_signal_received
from distvision.parallel.worker import pick_device
from distvision.recipes import Recipe
from distvision.train import resolve_recipe, train
from distvision.training.checkpoints import check_same_settings, lock_run_dir, read_heartbeat, resume_settings
from distvision.training.faults import lighthouse_restarts


def run(args: argparse.Namespace, argv: list[str]) -> None:
    """Train with the parsed settings; argv (the user's train flags) is passed on to local workers."""
    config = TrainConfig.from_namespace(args)
    if restarted_into_a_finished_run(config.out, os.environ):
        # A node torchrun restarted (its replica hung or died) while its peers finished the run: its work
        # is done, and a finished folder would otherwise be refused as a new run's.
        print(f"distvision: the run in {config.out} finished while this node was restarting; nothing is left "
              "to do", flush=True)
        return
    if config.workers == "auto":  # everything from here on sees a count
        config.workers = config.resolved_workers(torch.cuda.device_count(), len(os.sched_getaffinity(0)))
    config.validate()
    device = pick_device(config.device, 1).type
    config.recovery = config.resolved_recovery(under_torchrun=started_by_torchrun(), on_gpu=device == "cuda")
    config.check_recovery()
    recipe = resolve_recipe(config)  # unknown model, recipe or setting fails here, before any launch
    if getattr(args, "print_config", False):
        print(resolved_settings(config, recipe, device), end="")
        return
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    if config.data is None:
        from distvision.data.download import download_cifar10

        config.data = str(download_cifar10(cache_dir))
    config.out = str(config.run_dir())
    if (started_by_torchrun() or config.lighthouse) and os.environ.get("RANK", "0") == "0":
        # No launching command here (check_before_launch records them there): rank 0 records the
        # settings, once they are known to fit the folder's checkpoints.
        check_checkpoint_settings(config, recipe)
        write_run_config(config)
    if config.recovery == "live":
        from distvision.parallel.live import check_live_addresses

        check_live_addresses(config.lighthouse, config.bind)
        start_live(config, recipe, cache_dir, argv)
        return
    if runs_in_this_process(config):
        train_here(config, recipe, cache_dir, argv)
        return
    # Under torchrun a run folder with checkpoints is always resumed: a node joining a running job
    # and a restarted worker must continue it, and neither can tell itself from a new start.
    start_workers("train", train, config, lambda: check_before_launch(config, recipe, cache_dir, argv),
                  workers=config.workers, max_restarts=config.max_restarts, join_timeout=config.join_timeout,
                  stopped_hint=f"continue with --resume --out {config.out}")


def runs_in_this_process(config: TrainConfig) -> bool:
    """One local worker with no restarts to give (tune's trials, scale's and bench's points, or
    --workers 1 --max-restarts 0) needs neither an agent nor a process group: it trains in the command's
    own process, one Python and torch start-up fewer (benchmarks/RESULTS.md, 2026-12-03)."""
    return (config.workers == 1 and config.max_restarts == 0 and config.recovery == "restart"
            and not started_by_torchrun())


def train_here(config: TrainConfig, recipe: Recipe, cache_dir: Path, argv: list[str]) -> None:
    """The one worker, in this process: the launcher's checks, then the training loop; a stop signal
    ends the command as it ends a launched one (128 + the signal, and how to continue)."""
    check_before_launch(config, recipe, cache_dir, argv)
    train(config)
    if (number := stop_signal_received()) is not None:
        print(f"distvision: stopped by signal {number}; continue with --resume --out {config.out}", file=sys.stderr)
        sys.exit(128 + number)


def restarted_into_a_finished_run(out: str | None, environ) -> bool:
    """Whether this is a worker torchrun restarted after its run folder was finished (summary.json)."""
    restarts = int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    return bool(out) and restarts > 0 and (Path(out) / "summary.json").exists()


def run_replica(config: TrainConfig, environment: dict[str, str], progress) -> None:
    """One live worker, forked by the launcher: its replica number, the Lighthouse and the job's secret
    come in `environment`; `progress` is what the launcher's watchdog reads."""
    from distvision.parallel.live_launch import stop_with_launcher
    from distvision.parallel.watchdog import watch_this_replica

    os.environ.update(environment)
    watch_this_replica(progress)
    stop_with_launcher()
    run_as_worker(train, config)


def check_before_launch(config: TrainConfig, recipe: Recipe, cache_dir: Path, argv: list[str]) -> list[str]:
    """What fails once here rather than in every local worker; the workers' arguments."""
    if recipe.batch_size < config.workers:
        raise UserError(f"--batch-size {recipe.batch_size} is smaller than --workers {config.workers}: "
                        "every worker needs at least one sample per step")
    pick_device(config.device, config.workers)  # too few GPUs fails here, not in every worker
    has_checkpoints = bool(list_training_checkpoints(Path(config.out)))
    if has_checkpoints and not config.resume:
        raise UserError(f"--out {config.out} holds an unfinished run: add --resume to continue it, "
                        "or choose another folder")
    if config.resume and not has_checkpoints:
        raise UserError(f"--resume: {config.out} holds no checkpoint to continue from")
    check_checkpoint_settings(config, recipe)  # other settings fail here, before any worker starts
    ensure_prepared(Path(config.data), config.image_size, cache_dir)  # bad data fails before any worker starts
    write_run_config(config)
    # The workers get the user's arguments, with the data path, run folder, worker count and recovery
    # settled here.
    return [*argv, "--data", config.data, "--out", config.out, "--workers", str(config.workers),
            "--recovery", config.recovery]


def check_checkpoint_settings(config: TrainConfig, recipe: Recipe) -> None:
    """A run folder whose checkpoints were written with other settings is refused (the workers check again)."""
    saved = newest_checkpoint_settings(Path(config.out))
    if saved is not None:
        check_same_settings(Path(config.out), saved, resume_settings(config, recipe))


def write_run_config(config: TrainConfig) -> None:
    """RUN_DIR/config.toml: the run's settings, which `distvision train --config` reads back to train it
    again (in a new folder: the run folder's own settings, --out and --resume, are left out)."""
    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config_file(run_dir / "config.toml", config_file_values(config),
                      f"distvision {__version__}: the settings of the run in {run_dir}\n"
                      f"train again: distvision train --config {run_dir / 'config.toml'} "
                      "(a new run folder; flags override this file)")


def resolved_settings(config: TrainConfig, recipe: Recipe, device: str) -> str:
    """--print-config: the settings as a --config file, then, as comments, what they come to here."""
    world_size = (f"{os.environ.get('WORLD_SIZE', '?')} (torchrun's)" if started_by_torchrun()
                  else f"{config.workers} (local workers)")
    precision = "auto (measured once when training starts)" if config.precision == "auto" else config.precision
    resolved = [
        "",
        "Resolved here (comments: what the settings above come to on this machine)",
        f"data: {config.data or 'the official CIFAR-10, downloaded into the cache'}",
        f"run folder: {config.out or f'runs/{config.model}-<time the run starts>'}",
        f"device: {device}",
        f"world size: {world_size}",
        f"precision: {precision}",
        f"recovery: {config.recovery}",
        f"recipe {config.recipe!r} of {config.model}, as it trains (overrides applied):",
        *(f"  {name} = {json.dumps(value)}" for name, value in recipe.to_dict().items()),
    ]
    header = (f"distvision {__version__} train settings\n"
              "train with them: distvision train --config FILE (flags override the file)")
    return config_toml(config_file_values(config), header) + "".join(f"# {line}".rstrip() + "\n" for line in resolved)


def start_live(config: TrainConfig, recipe: Recipe, cache_dir: Path, argv: list[str]) -> None:
    """Live membership: be one replica (a launched worker, or one node's under torchrun), or launch them."""
    from distvision.parallel.live import REPLICA_VARIABLE
    from distvision.parallel.live_launch import LiveStopped, launch_live, stopped_exit

    if REPLICA_VARIABLE in os.environ or started_by_torchrun() or config.lighthouse:
        run_as_worker(train, config)
        return
    check_before_launch(config, recipe, cache_dir, argv)
    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(run_dir)  # the workers share the folder; this command holds it for them
    decide_precision(config, recipe, cache_dir)
    try:
        launch_live(partial(run_replica, config), config.workers, config.max_restarts, config.heartbeat_timeout,
                    run_dir / "workers.json", warm_modules=[__name__, "distvision.train"],
                    lighthouse_restarts=lighthouse_restarts(config),
                    current_step=lambda: (read_heartbeat(run_dir) or {}).get("step", -1))
    except LiveStopped as stop:
        stopped_exit(stop, f"continue with --resume --out {config.out}")
    finally:
        lock.close()


def decide_precision(config: TrainConfig, recipe: Recipe, cache_dir: Path) -> None:
    """--precision auto: measure once here (cached), so that every replica reads the same answer."""
    if config.precision != "auto":
        return
    from distvision.data.prepare import open_prepared
    from distvision.models.registry import create
    from distvision.precision import choose_precision

    device = pick_device(config.device, config.workers)
    prepared = open_prepared(ensure_prepared(Path(config.data), config.image_size, cache_dir))
    model = create(config.model, num_classes=len(prepared.classes), image_size=config.image_size).to(device)
    choose_precision("auto", model, config.model, recipe.batch_size, config.image_size, device, cache_dir)
