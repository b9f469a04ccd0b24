"""Command line: argument parsing only. A UserError becomes one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import fields
from pathlib import Path

from distvision import __version__
from distvision.config import SYNC_MODES, add_train_arguments, help_with_default, read_config_file
from distvision.errors import UserError
from distvision.parallel.launch import FOLLOW_PARENT_VARIABLE, WorkerFailed, stop_when_parent_dies

# Settings train-each settles itself for every subset's run, whatever a --config file says.
_SETTLED_BY_TRAIN_EACH = ("data", "out", "workers", "resume")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file of train settings (a run's config.toml, a tune's best.toml); "
                        "flags given here override it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings as a --config file and exit, without training")


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's help says its default (help_with_default), so none can be forgotten."""
    for action in parser._actions:  # argparse lists a parser's options nowhere public
        if action.option_strings:
            action.help = help_with_default(action.help, action.default)


def build_parser(train_defaults: dict | None = None) -> argparse.ArgumentParser:
    """The command line; train_defaults (from `--config FILE`) replace the defaults of train's settings."""
    parser = argparse.ArgumentParser(prog="distvision", description="Distributed image classifier training.")
    parser.add_argument("--version", action="version", version=f"distvision {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model data-parallel on several workers")
    add_train_arguments(train, train_defaults)
    _add_config_arguments(train)
    prepare = commands.add_parser("prepare", help="decode a data source once into a fast memory-mapped cache")
    prepare.add_argument("path", help="image folder, CIFAR-10 batches (folder or .tar.gz), a .csv/.tsv list "
                         "of images or an .npz")
    prepare.add_argument("--out", required=True, help="the prepared folder to write (required); train's --data "
                         "takes it")
    prepare.add_argument("--image-size", type=int, default=32, help="side in pixels the images are resized to")
    prepare.add_argument("--processes", type=int, help="decoding processes (default: all cores)")
    each = commands.add_parser("train-each", help="train one independent model per data subset, several at once")
    each_defaults = {k: v for k, v in (train_defaults or {}).items() if k not in _SETTLED_BY_TRAIN_EACH}
    add_train_arguments(each, dict(each_defaults, workers=1))
    _add_config_arguments(each)
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
    models = commands.add_parser("models", help="list the registered models and their default recipes")
    models.add_argument("--json", action="store_true", help="one JSON object per model, with every recipe field "
                        "(for scripts)")
    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint on a data set's test split")
    evaluate.add_argument("--checkpoint", required=True, help="run folder or its checkpoint/ folder")
    evaluate.add_argument("--data", required=True, help="the data set whose test split is evaluated, as for "
                          "train (required)")
    evaluate.add_argument("--cache-dir", help="where prepared data is cached (default ~/.cache/distvision)")
    _add_classify_arguments(commands.add_parser(
        "classify", help="classify a folder tree, a list of image paths or a prepared folder with a checkpoint"))
    _add_tune_arguments(commands.add_parser("tune", help="search hyperparameters with Optuna, trials in parallel"))
    _add_scale_arguments(commands.add_parser(
        "scale", help="measure training over workers, data and batch sizes; fit a model; predict speedup"))
    _add_bench_arguments(commands.add_parser(
        "bench", help="train a suite of problems at several worker counts and sync modes; a results table"))
    for command in commands.choices.values():
        _show_defaults(command)
    _settled_by_train_each(each)  # after: the settings it replaces have no default here
    return parser


def _settled_by_train_each(parser: argparse.ArgumentParser) -> None:
    """train-each's own meaning of the train settings it settles for every subset's run."""
    helps = {
        "data": ("a folder of subset folders, or a path,label,subset CSV (required; nothing is downloaded)", "ROOT"),
        "out": ("one run folder per subset goes in it (required; no default)", "EACH_DIR"),
        "workers": ("not used here: see --workers-per-job", None),
        "resume": ("not used here: a subset's unfinished run is always continued", None),
    }
    for action in parser._actions:  # argparse lists a parser's options nowhere public
        if action.dest in helps:
            action.help, metavar = helps[action.dest]
            action.metavar = metavar or action.metavar


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
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=defaults["device"],
                        help="auto: CUDA when a GPU is visible, else the CPU")
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


def _add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    from distvision.tune.config import PRUNERS, SAMPLERS, TuneConfig

    tune_defaults = TuneConfig()
    parser.add_argument("--data", help="as for train; default: download the official CIFAR-10")
    parser.add_argument("--model", default=tune_defaults.model, help="a model from `distvision models`, or package.module:function or file.py:function")
    parser.add_argument("--recipe", default=tune_defaults.recipe, help="the recipe whose settings are searched")
    parser.add_argument("--space", help="TOML search space (default: around the model's recipe)")
    parser.add_argument("--trials", type=int, default=tune_defaults.trials,
                        help="finished trials wanted in the study, over all its workers (default %(default)s)")
    parser.add_argument("--parallel", type=int, default=tune_defaults.parallel,
                        help="trial workers on this machine, each with cores/P threads (default %(default)s)")
    parser.add_argument("--workers-per-trial", type=int, default=tune_defaults.workers_per_trial,
                        help="data-parallel workers inside each trial (default %(default)s)")
    parser.add_argument("--sync", choices=SYNC_MODES, default=tune_defaults.sync,
                        help="as for train, in every trial (with --workers-per-trial 2 or more)")
    parser.add_argument("--sync-every", default=tune_defaults.sync_every, metavar="K|epoch", help="as for train")
    parser.add_argument("--quantize", choices=("none", "int8", "int4"), default=tune_defaults.quantize,
                        help="as for train (local-sgd, diloco)")
    parser.add_argument("--fragments", type=int, default=tune_defaults.fragments, metavar="F",
                        help="as for train (diloco: Streaming DiLoCo)")
    parser.add_argument("--overlap", type=int, default=tune_defaults.overlap, metavar="T",
                        help="as for train (diloco)")
    parser.add_argument("--epochs", type=int, help="most epochs per trial (default: the recipe's)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=tune_defaults.sampler,
                        help="Optuna's sampler: how the next trial's settings are chosen")
    parser.add_argument("--pruner", choices=PRUNERS, default=tune_defaults.pruner,
                        help="Optuna's pruner: which trials stop early, after an epoch (none: every trial trains "
                        "to the end)")
    parser.add_argument("--storage", help="SQLAlchemy URL shared by several machines, e.g. "
                        "postgresql://user@host/db (default: a journal file in --out)")
    parser.add_argument("--heartbeat-seconds", type=float, default=tune_defaults.heartbeat_seconds,
                        help="database storage: how often a trial worker marks its trial alive (default %(default)s)")
    parser.add_argument("--heartbeat-grace", type=float, default=tune_defaults.heartbeat_grace,
                        help="database storage: a trial unmarked this long belongs to a dead worker and is run "
                        "again (default %(default)s)")
    parser.add_argument("--study", default=tune_defaults.study, help="study name (default %(default)s)")
    parser.add_argument("--out", default=tune_defaults.out, help="output folder (default %(default)s)")
    parser.add_argument("--seed", type=int, default=tune_defaults.seed, help="training seed of every trial")
    parser.add_argument("--val-fraction", type=float, default=tune_defaults.val_fraction,
                        help="held-out share of the training set that scores trials (default %(default)s)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=tune_defaults.precision,
                        help="as for train")
    parser.add_argument("--image-size", type=int, default=tune_defaults.image_size, help="as for train")
    parser.add_argument("--cache-dir", help="as for train (default ~/.cache/distvision)")


def _add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    from distvision.scale.settings import ScaleConfig

    d = ScaleConfig(data=None)
    parser.add_argument("--data", help="as for train; default: download the official CIFAR-10")
    parser.add_argument("--model", default=d.model, help="a model from `distvision models`, or package.module:function or file.py:function")
    parser.add_argument("--workers", default=",".join(map(str, d.workers)), help="worker counts (default %(default)s)")
    parser.add_argument("--fractions", default=",".join(map(str, d.fractions)),
                        help="shares of the training set (default %(default)s)")
    parser.add_argument("--batch-sizes", default=",".join(map(str, d.batch_sizes)),
                        help="global batch sizes (default %(default)s)")
    parser.add_argument("--sync", default=",".join(d.syncs), help="sync modes, from allreduce,local-sgd,diloco; "
                        "local-sgd:int8 or diloco:int4 quantize the changes, diloco:f4 syncs the model in 4 "
                        "fragments and diloco:o2 overlaps an exchange with 2 steps (Streaming DiLoCo; all: "
                        "diloco:int4:f4:o2) (default %(default)s)")
    parser.add_argument("--sync-every", default=d.sync_every, help="local SGD's period K (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="epochs of every run (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="runs per point; the median counts "
                        "(default %(default)s)")
    parser.add_argument("--threads-per-worker", type=int, default=d.threads_per_worker,
                        help="threads of every worker at every worker count (default %(default)s)")
    parser.add_argument("--predict-workers", default=",".join(map(str, d.predict_workers)),
                        help="worker counts to predict (default %(default)s)")
    parser.add_argument("--network", help="network to predict for, BANDWIDTH[,LATENCY], e.g. 10gbit,50us "
                        "(default: the one measured here)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision,
                        help="as for train; fixed, so that every run is timed alike")
    parser.add_argument("--image-size", type=int, default=d.image_size, help="as for train")
    parser.add_argument("--seed", type=int, default=d.seed, help="training seed of every run")
    parser.add_argument("--cache-dir", help="as for train (default ~/.cache/distvision)")
    parser.add_argument("--out", default=d.out, help="report folder (default %(default)s); finished runs in it "
                        "are reused")


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from distvision.bench.run import BenchConfig

    d = BenchConfig()
    parser.add_argument("--problems", default=d.problems,
                        help="'all', or names from --list (comma-separated); folder:PATH for your own image folder")
    parser.add_argument("--list", action="store_true", help="list the problems and exit")
    parser.add_argument("--workers", default=",".join(map(str, d.workers)), help="worker counts (default %(default)s)")
    parser.add_argument("--sync", default=",".join(d.syncs), help="sync modes; local-sgd:int8 or diloco:int4 "
                        "quantize the changes, diloco:f4 syncs the model in 4 fragments, diloco:o2 overlaps an "
                        "exchange with 2 steps (default %(default)s)")
    parser.add_argument("--sync-every", default=d.sync_every, help="local SGD's period K (default %(default)s)")
    parser.add_argument("--max-epochs", type=int, help="cap every problem's epoch budget")
    parser.add_argument("--epochs-for", action="append", default=[], metavar="PROBLEM=EPOCHS",
                        help="another budget for one problem, e.g. cifar10-fastnet=1 (repeatable)")
    parser.add_argument("--threads-per-worker", type=int, default=d.threads_per_worker,
                        help="threads of every worker at every worker count")
    parser.add_argument("--cifar-data", help="CIFAR-10 for the cifar10 problems (default: download it)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision,
                        help="as for train; fixed, so that every run is timed alike")
    parser.add_argument("--seed", type=int, default=d.seed, help="training seed of every run")
    parser.add_argument("--cache-dir", help="as for train (default ~/.cache/distvision)")
    parser.add_argument("--out", default=d.out, help="output folder (default %(default)s); finished runs are reused")


def parse_command_line(argv: list[str]) -> argparse.Namespace:
    """The parsed command line, with a train or train-each `--config FILE` read in."""
    args = build_parser().parse_args(argv)
    if args.command in ("train", "train-each") and args.config:
        # The file's values become the defaults, so every flag on the command line still wins.
        args = build_parser(read_config_file(Path(args.config))).parse_args(argv)
    return args


def run(argv: list[str] | None = None) -> None:
    """Parse the command line and run the command (distvision/commands/<command>.py)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_command_line(argv)
    command = importlib.import_module(f"distvision.commands.{args.command.replace('-', '_')}")
    status = command.run(args, argv[1:])
    if status is not None:
        sys.exit(status)


def main(argv: list[str] | None = None) -> None:
    parent = os.environ.pop(FOLLOW_PARENT_VARIABLE, None)
    if parent:  # started as a child (parallel/child.py): stop when the parent dies
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
