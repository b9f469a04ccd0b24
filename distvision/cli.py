"""Command line: argument parsing only. A UserError becomes one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from distvision.config import TrainConfig
from distvision.errors import UserError
from distvision.parallel.launch import FOLLOW_PARENT_VARIABLE, WorkerFailed, stop_when_parent_dies
from distvision.recipes import TRICK_SWITCHES

DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.name != "data"}


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    recipe_note = "(default: the model's recipe, see `distvision models`)"
    parser.add_argument("--data", help="image folder, CIFAR-10 batches (folder or .tar.gz) or a prepared "
                        "folder; default: download the official CIFAR-10")
    parser.add_argument("--model", default=DEFAULTS["model"], help="registered model name (default %(default)s)")
    parser.add_argument("--recipe", default=DEFAULTS["recipe"], help="'default' or a model's named recipe, "
                        "e.g. 'caffe' for Caffe's exact solver")
    parser.add_argument("--workers", type=int, default=DEFAULTS["workers"],
                        help="local worker processes (default %(default)s); ignored under torchrun")
    parser.add_argument("--epochs", type=int, help=f"epochs {recipe_note}")
    parser.add_argument("--batch-size", type=int, help=f"global batch size, split across workers {recipe_note}")
    parser.add_argument("--lr", type=float, help=f"learning rate for the global batch {recipe_note}")
    parser.add_argument("--momentum", type=float, help=f"SGD momentum {recipe_note}")
    parser.add_argument("--weight-decay", type=float, help=f"weight decay {recipe_note}")
    parser.add_argument("--label-smoothing", type=float, help=f"label smoothing {recipe_note}")
    parser.add_argument("--set", dest="recipe_settings", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any recipe field, e.g. --set cutout=8 --set 'schedule=[[0,1],[1,0]]'")
    tricks = parser.add_argument_group("switching off the recipe's tricks (for ablations)")
    for name in TRICK_SWITCHES:
        tricks.add_argument(f"--no-{name}", dest="disable", action="append_const", const=name, default=[],
                            help=f"recipe fields: {', '.join(f'{k}={v}' for k, v in TRICK_SWITCHES[name].items())}")
    parser.add_argument("--sync-bn", action="store_true",
                        help="batch-norm statistics over all workers (CUDA only; default: per worker)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=DEFAULTS["precision"],
                        help="auto measures which is faster here (default)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=DEFAULTS["device"])
    sync = parser.add_argument_group("synchronisation and batch balancing")
    sync.add_argument("--sync", choices=["allreduce", "local-sgd"], default=DEFAULTS["sync"],
                      help="allreduce: gradients averaged every step (default); local-sgd: local steps, "
                      "replicas averaged every --sync-every steps (Dahl et al.'s Pattern Parallel Training)")
    sync.add_argument("--sync-every", default=DEFAULTS["sync_every"], metavar="K|epoch",
                      help="local-sgd: optimizer steps between averagings, or 'epoch' (default %(default)s)")
    sync.add_argument("--sync-warmup", type=int, default=DEFAULTS["sync_warmup"], metavar="S",
                      help="local-sgd: all-reduce every step for the first S steps (default %(default)s)")
    sync.add_argument("--compress", choices=["none", "fp16", "bf16", "powersgd"], default=DEFAULTS["compress"],
                      help="allreduce: compress gradients through a DDP communication hook")
    sync.add_argument("--powersgd-rank", type=int, default=DEFAULTS["powersgd_rank"])
    sync.add_argument("--lr-scaling", choices=["none", "linear", "sqrt"], default=DEFAULTS["lr_scaling"],
                      help="scale the lr given for --base-batch-size to the global batch (Goyal et al.)")
    sync.add_argument("--base-batch-size", type=int, help="batch size the lr is given for (default: the recipe's)")
    sync.add_argument("--warmup-epochs", type=float, default=DEFAULTS["warmup_epochs"],
                      help="linear lr warmup over the first epochs (default %(default)s)")
    sync.add_argument("--balance", choices=["even", "throughput"], default=DEFAULTS["balance"],
                      help="throughput: split each global batch across workers in proportion to measured speed")
    stopping = parser.add_argument_group("stopping (every worker stops at the same step)")
    stopping.add_argument("--target-accuracy", type=float, help="stop at the first epoch reaching this accuracy")
    stopping.add_argument("--patience", type=int, help="stop after N epochs without improvement")
    stopping.add_argument("--min-delta", type=float, default=DEFAULTS["min_delta"],
                          help="smallest accuracy gain that counts as an improvement (default %(default)s)")
    stopping.add_argument("--monitor", choices=["test", "val"], default=DEFAULTS["monitor"],
                          help="accuracy that --target-accuracy and --patience watch (default %(default)s)")
    stopping.add_argument("--max-time", type=float, help="stop after this many seconds of training")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--val-fraction", type=float, default=DEFAULTS["val_fraction"],
                        help="seeded share of the training set held out for validation (default 0)")
    parser.add_argument("--train-fraction", type=float, default=DEFAULTS["train_fraction"],
                        help="train on this seeded share of the training set (default 1: all of it)")
    parser.add_argument("--threads-per-worker", type=int,
                        help="threads of each worker (default: the cores split over the local workers)")
    parser.add_argument("--image-size", type=int, default=DEFAULTS["image_size"])
    parser.add_argument("--out", help="run folder (default runs/<model>-<time>)")
    parser.add_argument("--cache-dir", help="where prepared data is cached (default ~/.cache/distvision)")
    parser.add_argument("--collective-timeout", type=float, default=DEFAULTS["collective_timeout"],
                        help="seconds a collective waits for a peer before the group restarts (default %(default)s)")
    parser.add_argument("--checkpoint-every", type=float, default=DEFAULTS["checkpoint_every"],
                        help="seconds of training between checkpoints; also at every epoch end (default %(default)s)")
    parser.add_argument("--max-restarts", type=int, default=DEFAULTS["max_restarts"],
                        help="restarts of the local worker group after a worker dies (default %(default)s)")
    parser.add_argument("--join-timeout", type=float, default=DEFAULTS["join_timeout"],
                        help="seconds to wait for the workers at rendezvous before failing (default %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    parser.add_argument("--config", help="TOML file of train settings (e.g. a tune's best.toml); "
                        "flags given here override it")
    debug = parser.add_argument_group("debugging")
    debug.add_argument("--audit-samples", action="store_true",
                       help="log each rank's sample indices per step to RUN_DIR/audit/")
    debug.add_argument("--debug-stop-at-step", type=int,
                       help="stop resumably at the first exchange of losses and votes from this step on, "
                            "as on SIGTERM")
    debug.add_argument("--debug-step-delay", type=float, default=0.0, help="sleep after every step (seconds)")
    debug.add_argument("--debug-slowdown", metavar="RANK:FACTOR",
                       help="make one worker FACTOR times slower (sleeps in proportion to its compute)")
    debug.add_argument("--debug-nan-at", metavar="RANK:STEP", help="make one worker's loss NaN at a global step")


def build_parser(train_defaults: dict | None = None) -> argparse.ArgumentParser:
    """The command line; train_defaults (from `train --config FILE`) replace train's defaults."""
    parser = argparse.ArgumentParser(prog="distvision", description="Distributed image classifier training.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model data-parallel on several workers")
    _add_train_arguments(train)
    train.set_defaults(**(train_defaults or {}))
    prepare = commands.add_parser("prepare", help="decode a data source once into a fast memory-mapped cache")
    prepare.add_argument("path")
    prepare.add_argument("--out", required=True)
    prepare.add_argument("--image-size", type=int, default=32)
    prepare.add_argument("--processes", type=int, help="decoding processes (default: all cores)")
    each = commands.add_parser("train-each", help="train one independent model per data subset, several at once")
    _add_train_arguments(each)
    each.set_defaults(workers=1)
    group = each.add_argument_group("train-each")
    group.add_argument("--parallel", type=int, default=1, help="subsets trained at once here, each on its share "
                       "of the cores (default %(default)s)")
    group.add_argument("--workers-per-job", type=int, default=1,
                       help="data-parallel workers inside each subset's training (default %(default)s)")
    group.add_argument("--compare-global", action="store_true",
                       help="also train one model on all subsets and compare it on each subset's test split")
    group.add_argument("--only", help="train just this subset (for schedulers' array jobs)")
    group.add_argument("--only-index", type=int, help="train just the I-th job (subsets by name, then the "
                       "global model), e.g. $SLURM_ARRAY_TASK_ID")
    group.add_argument("--lease-seconds", type=float, default=60.0, help="a claim not renewed this long is "
                       "taken over by another train-each process (default %(default)s)")
    commands.add_parser("models", help="list the registered models and their default recipes")
    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint on a data set's test split")
    evaluate.add_argument("--checkpoint", required=True, help="run folder or its checkpoint/ folder")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--cache-dir")
    _add_classify_arguments(commands.add_parser(
        "classify", help="classify a folder tree, a list of image paths or a prepared folder with a checkpoint"))
    _add_tune_arguments(commands.add_parser("tune", help="search hyperparameters with Optuna, trials in parallel"))
    _add_scale_arguments(commands.add_parser(
        "scale", help="measure training over workers, data and batch sizes; fit a model; predict speedup"))
    _add_bench_arguments(commands.add_parser(
        "bench", help="train a suite of problems at several worker counts and sync modes; a results table"))
    return parser


# ---------------------------------------------------------------------------------------------- classify
def _add_classify_arguments(parser: argparse.ArgumentParser) -> None:
    from distvision.classify.settings import ClassifyConfig

    defaults = {f.name: f.default for f in fields(ClassifyConfig)}
    parser.add_argument("--checkpoint", required=True, help="run folder or its checkpoint/ folder")
    parser.add_argument("--input", required=True,
                        help="folder tree of images, text file listing image paths, or prepared folder")
    parser.add_argument("--out", default=defaults["out"],
                        help="predictions CSV (default %(default)s); errors.csv, summary.json and parts/ go beside it")
    parser.add_argument("--workers", type=int, default=defaults["workers"],
                        help="local worker processes (default %(default)s); ignored under torchrun")
    parser.add_argument("--top-k", type=int, default=defaults["top_k"], help="classes per row (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                        help="images per forward pass (default %(default)s)")
    parser.add_argument("--chunk-size", type=int, default=defaults["chunk_size"],
                        help="files per unit of work handed to a worker (default %(default)s)")
    parser.add_argument("--decode-threads", type=int, help="decoding threads per worker (default: its cores)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=defaults["resume"],
                        help="continue from the parts of an earlier run (default: when there are parts)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=defaults["device"])
    parser.add_argument("--max-restarts", type=int, default=defaults["max_restarts"],
                        help="restarts of the local worker group after a worker dies (default %(default)s)")
    parser.add_argument("--join-timeout", type=float, default=defaults["join_timeout"],
                        help="seconds to wait for the workers at rendezvous (default %(default)s)")
    parser.add_argument("--fallback", choices=["none", "global"], default="none",
                        help="with a train-each folder as --checkpoint: images of a subset without a model go "
                        "to the global model instead of errors.csv")
    debug = parser.add_argument_group("debugging")
    debug.add_argument("--debug-chunk-delay", type=float, default=0.0, help="sleep after every chunk (seconds)")
    debug.add_argument("--debug-slow-rank", type=int, help="only this rank sleeps after its chunks")
    # Set by the local launcher for its workers.
    parser.add_argument("--launched-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--planned", action="store_true", help=argparse.SUPPRESS)


def _classify_command(args: argparse.Namespace, argv: list[str]) -> None:
    from distvision.classify.routed import classify_routed, is_each_dir
    from distvision.classify.settings import ClassifyConfig
    from distvision.classify.worker import classify_command

    config = ClassifyConfig(**{f.name: getattr(args, f.name) for f in fields(ClassifyConfig)})
    if is_each_dir(Path(config.checkpoint)):  # train-each's models: each image to its subset's model
        classify_routed(config, argv, args.fallback)
        return
    classify_command(config, argv)
# ------------------------------------------------------------------------------------------ end classify


# --- distvision tune ---
def _add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    from distvision.tune.config import PRUNERS, SAMPLERS, TuneConfig

    tune_defaults = TuneConfig()
    parser.add_argument("--data", help="as for train; default: download the official CIFAR-10")
    parser.add_argument("--model", default=tune_defaults.model)
    parser.add_argument("--recipe", default=tune_defaults.recipe, help="the recipe whose settings are searched")
    parser.add_argument("--space", help="TOML search space (default: around the model's recipe)")
    parser.add_argument("--trials", type=int, default=tune_defaults.trials,
                        help="finished trials wanted in the study, over all its workers (default %(default)s)")
    parser.add_argument("--parallel", type=int, default=tune_defaults.parallel,
                        help="trial workers on this machine, each with cores/P threads (default %(default)s)")
    parser.add_argument("--workers-per-trial", type=int, default=tune_defaults.workers_per_trial,
                        help="data-parallel workers inside each trial (default %(default)s)")
    parser.add_argument("--epochs", type=int, help="most epochs per trial (default: the recipe's)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=tune_defaults.sampler)
    parser.add_argument("--pruner", choices=PRUNERS, default=tune_defaults.pruner)
    parser.add_argument("--storage", help="SQLAlchemy URL shared by several machines, e.g. "
                        "postgresql://user@host/db (default: a journal file in --out)")
    parser.add_argument("--study", default=tune_defaults.study, help="study name (default %(default)s)")
    parser.add_argument("--out", default=tune_defaults.out, help="output folder (default %(default)s)")
    parser.add_argument("--seed", type=int, default=tune_defaults.seed, help="training seed of every trial")
    parser.add_argument("--val-fraction", type=float, default=tune_defaults.val_fraction,
                        help="held-out share of the training set that scores trials (default %(default)s)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=tune_defaults.precision)
    parser.add_argument("--image-size", type=int, default=tune_defaults.image_size)
    parser.add_argument("--cache-dir")


def _tune_command(args: argparse.Namespace) -> None:
    from distvision.tune.config import TuneConfig
    from distvision.tune.run import run_tune

    run_tune(TuneConfig(**{f.name: getattr(args, f.name) for f in fields(TuneConfig)}))
# --- end of distvision tune ---


# --- distvision scale and bench ---
def _add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    from distvision.scale.settings import ScaleConfig

    d = ScaleConfig(data=None)
    parser.add_argument("--data", help="as for train; default: download the official CIFAR-10")
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--workers", default=",".join(map(str, d.workers)), help="worker counts (default %(default)s)")
    parser.add_argument("--fractions", default=",".join(map(str, d.fractions)),
                        help="shares of the training set (default %(default)s)")
    parser.add_argument("--batch-sizes", default=",".join(map(str, d.batch_sizes)),
                        help="global batch sizes (default %(default)s)")
    parser.add_argument("--sync", default=",".join(d.syncs), help="sync modes: allreduce,local-sgd")
    parser.add_argument("--sync-every", default=d.sync_every, help="local SGD's period K (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--repeats", type=int, default=d.repeats, help="runs per point; the median counts")
    parser.add_argument("--threads-per-worker", type=int, default=d.threads_per_worker,
                        help="threads of every worker at every worker count (default %(default)s)")
    parser.add_argument("--predict-workers", default=",".join(map(str, d.predict_workers)),
                        help="worker counts to predict (default %(default)s)")
    parser.add_argument("--network", help="network to predict for, BANDWIDTH[,LATENCY], e.g. 10gbit,50us "
                        "(default: the one measured here)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision)
    parser.add_argument("--image-size", type=int, default=d.image_size)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--cache-dir")
    parser.add_argument("--out", default=d.out, help="report folder (default %(default)s); finished runs in it "
                        "are reused")


def _scale_command(args: argparse.Namespace) -> None:
    from distvision.scale import run_scale
    from distvision.scale.settings import ScaleConfig, parse_list, parse_syncs

    config = ScaleConfig(
        data=args.data, model=args.model, out=args.out, workers=parse_list(args.workers, int, "--workers", 1),
        fractions=parse_list(args.fractions, float, "--fractions", 1e-6, 1.0),
        batch_sizes=parse_list(args.batch_sizes, int, "--batch-sizes", 1), syncs=parse_syncs(args.sync),
        sync_every=args.sync_every, epochs=args.epochs, repeats=args.repeats,
        threads_per_worker=args.threads_per_worker,
        predict_workers=parse_list(args.predict_workers, int, "--predict-workers", 1), network=args.network,
        precision=args.precision, image_size=args.image_size, seed=args.seed, cache_dir=args.cache_dir)
    result = run_scale(config)
    fastest = result["recommendation"]["fastest"]
    print(f"distvision scale: model predicts every point within {result['max_relative_error']:.1%}; fastest on "
          f"{result['recommendation']['network']}: {fastest['workers']} worker(s), {fastest['sync']}, batch "
          f"{fastest['batch_size']} ({fastest['speedup']}x); report in {result['out']}/report.md")


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from distvision.bench.run import BenchConfig

    d = BenchConfig()
    parser.add_argument("--problems", default=d.problems,
                        help="'all', or names from --list (comma-separated); folder:PATH for your own image folder")
    parser.add_argument("--list", action="store_true", help="list the problems and exit")
    parser.add_argument("--workers", default=",".join(map(str, d.workers)), help="worker counts (default %(default)s)")
    parser.add_argument("--sync", default=",".join(d.syncs), help="sync modes (default %(default)s)")
    parser.add_argument("--sync-every", default=d.sync_every, help="local SGD's period K (default %(default)s)")
    parser.add_argument("--max-epochs", type=int, help="cap every problem's epoch budget")
    parser.add_argument("--epochs-for", action="append", default=[], metavar="PROBLEM=EPOCHS",
                        help="another budget for one problem, e.g. cifar10-fastnet=1 (repeatable)")
    parser.add_argument("--threads-per-worker", type=int, default=d.threads_per_worker)
    parser.add_argument("--cifar-data", help="CIFAR-10 for the cifar10 problems (default: download it)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--cache-dir")
    parser.add_argument("--out", default=d.out, help="output folder (default %(default)s); finished runs are reused")


def _bench_command(args: argparse.Namespace) -> None:
    from distvision.bench.problems import list_problems
    from distvision.bench.run import BenchConfig, format_row, run_bench
    from distvision.scale.settings import parse_list, parse_syncs

    if args.list:
        for problem in list_problems():
            print(f"{problem.name:<22} {problem.model:<12} {problem.description}")
        return
    if args.threads_per_worker < 1:
        raise UserError(f"--threads-per-worker must be at least 1 (got {args.threads_per_worker})")
    epochs_for = {}
    for item in args.epochs_for:
        name, _, epochs = item.partition("=")
        if not epochs.isdigit() or int(epochs) < 1:
            raise UserError(f"--epochs-for takes PROBLEM=EPOCHS with EPOCHS >= 1, e.g. cifar10-fastnet=1 (got {item!r})")
        epochs_for[name.strip()] = int(epochs)
    config = BenchConfig(
        problems=args.problems, epochs_for=epochs_for, workers=parse_list(args.workers, int, "--workers", 1), syncs=parse_syncs(args.sync),
        sync_every=args.sync_every, max_epochs=args.max_epochs, threads_per_worker=args.threads_per_worker,
        cifar_data=args.cifar_data, precision=args.precision, seed=args.seed, out=args.out, cache_dir=args.cache_dir)
    rows = run_bench(config)
    print("\n".join(format_row(row) for row in rows))
    print(f"distvision bench: table in {Path(args.out) / 'bench.md'}")
# --- end of distvision scale and bench ---


def _train_command(args: argparse.Namespace, argv: list[str]) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from distvision.checkpoint import list_training_checkpoints
    from distvision.data.prepare import default_cache_dir, ensure_prepared
    from distvision.parallel.launch import launch_local, run_worker, started_by_torchrun
    from distvision.train import pick_device, resolve_recipe

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    config = TrainConfig(**values)
    config.validate()
    recipe = resolve_recipe(config)  # unknown model, recipe or setting fails here, before any launch
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    if config.data is None:
        from distvision.data.download import download_cifar10

        config.data = str(download_cifar10(cache_dir))
    config.out = str(config.run_dir())
    if started_by_torchrun():
        # Under torchrun a run folder with checkpoints is always resumed: a node joining a running
        # job and a restarted worker must continue it, and neither can tell itself from a new start.
        run_worker(config)
        return
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
    # Prepare once here so that bad data fails before any worker starts.
    ensure_prepared(Path(config.data), config.image_size, cache_dir)
    try:
        # The workers get the user's arguments, with the data path and run folder settled here.
        launch_local(["train", *argv, "--data", config.data, "--out", config.out], config.workers,
                     max_restarts=config.max_restarts, join_timeout=config.join_timeout)
    except SignalException as stop:
        print(f"distvision: stopped by signal {stop.sigval}; continue with --resume --out {config.out}",
              file=sys.stderr)
        sys.exit(128 + int(stop.sigval))


# train-each's own flags, and the train flags it settles itself for each subset's run.
_EACH_ONLY = {"parallel", "workers_per_job", "compare_global", "only", "only_index", "lease_seconds",
              "data", "out", "workers", "resume", "command", "help"}


def _train_each_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from distvision.train_each import PoolSettings, train_each

    if args.data is None or args.out is None:
        raise UserError("train-each needs --data ROOT (subset folders or a path,label,subset CSV) and --out EACH_DIR")
    for name in ("parallel", "workers_per_job"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    TrainConfig(**dict(values, workers=args.workers_per_job, out=None)).validate()  # EACH_DIR is no run folder
    # Every train flag the user set, passed on unchanged to each subset's `distvision train`.
    train_args = []
    for action in parser._actions:
        if action.dest in _EACH_ONLY or not action.option_strings:
            continue
        value = getattr(args, action.dest)
        if value == action.default or value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            train_args.append(action.option_strings[0])
        elif isinstance(action, argparse._AppendConstAction):  # --no-TRICK: several flags, one list
            if action.const in value:
                train_args.append(action.option_strings[0])
        elif isinstance(action, argparse._AppendAction):
            train_args += [item for v in value for item in (action.option_strings[0], v)]
        else:
            train_args += [action.option_strings[0], str(value)]
    settings = PoolSettings(args.parallel, args.workers_per_job, args.lease_seconds, train_args)
    return train_each(Path(args.data), Path(args.out), settings, args.image_size,
                      Path(args.cache_dir) if args.cache_dir else None, args.compare_global, args.only,
                      args.only_index)


def _models_command() -> None:
    from distvision.models.registry import count_parameters, list_models, mflops_per_image

    print(f"{'name':<12} {'params':>10} {'MFLOPs/img':>10}  description")
    for entry in list_models():
        model = entry.builder(num_classes=10, image_size=32)
        print(f"{entry.name:<12} {count_parameters(model):>10,} {mflops_per_image(model, 32):>10.1f}  "
              f"{entry.description}")
        recipes = {"default": entry.recipe, **entry.alternatives}
        for name, recipe in recipes.items():
            print(f"{'':<12} recipe {name}: {json.dumps(recipe.to_dict())}")


def run(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and args.config:
        from distvision.config import read_config_file

        # The file's values become the defaults, so every flag on the command line still wins.
        args = build_parser(read_config_file(Path(args.config))).parse_args(argv)
    if args.command == "train":
        _train_command(args, argv[1:])
    elif args.command == "tune":
        _tune_command(args)
    elif args.command == "scale":
        _scale_command(args)
    elif args.command == "bench":
        _bench_command(args)
    elif args.command == "train-each":
        each_parser = parser._subparsers._group_actions[0].choices["train-each"]
        sys.exit(_train_each_command(args, each_parser))
    elif args.command == "prepare":
        from distvision.data.prepare import prepare

        out = Path(args.out)
        manifest = prepare(Path(args.path), out, args.image_size, args.processes)
        print(f"prepared {manifest['train_count']} training and {manifest['test_count']} test images "
              f"({len(manifest['classes'])} classes) into {out} in {manifest['prepare_seconds']}s; "
              f"skipped {len(manifest['skipped_files'])} unreadable file(s)")
    elif args.command == "models":
        _models_command()
    elif args.command == "evaluate":
        from distvision.evaluate import evaluate_checkpoint

        result = evaluate_checkpoint(Path(args.checkpoint), Path(args.data),
                                     Path(args.cache_dir) if args.cache_dir else None)
        print(json.dumps(result))
    elif args.command == "classify":
        _classify_command(args, argv[1:])


def main(argv: list[str] | None = None) -> None:
    parent = os.environ.pop(FOLLOW_PARENT_VARIABLE, None)
    if parent:  # started by train-each or tune: stop when they die
        stop_when_parent_dies(int(parent))
    try:
        run(argv)
    except UserError as error:
        print(f"distvision: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("distvision: interrupted", file=sys.stderr)
        sys.exit(130)
    except WorkerFailed as error:
        print(f"distvision: error: {error}", file=sys.stderr)
        sys.exit(1)
