"""Settings of `distvision train`: one dataclass, the single source of every setting.

Each field carries its default, its command-line help and its choices; the fields are grouped in
sections (data, recipe overrides, parallel, stopping, fault tolerance, debug) that check
themselves. The train command line is generated from this table (add_train_arguments), and
TrainConfig.to_argv / from_argv turn a config into that command line and back, which is how every
parent (tune, train-each, scale, bench) hands its settings to a `distvision train` child.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path

from distvision.errors import UserError
from distvision.fileio import write_text_atomic
from distvision.recipes import TRICK_SWITCHES

RECIPE_NOTE = "(default: the model's recipe, see `distvision models`)"
SYNC_MODES = ("allreduce", "local-sgd", "diloco")  # diloco runs under live membership only
RECOVERY_MODES = ("auto", "live", "restart")
FAULT_KINDS = ("kill", "term", "stop", "hang", "lighthouse")  # --debug-fault's
FAULT_PHASES = ("step", "exchange", "eval", "heal")
DEFAULT_SYNC_EVERY = "8"  # local SGD's period when --sync-every is not given


def flag_options(help: str | None = None, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
                 metavar: str | None = None, recovery: str | None = None,
                 parse: Callable[[str], object] | None = None) -> dict:
    """A field's metadata for its command-line flag: help, choices, metavar, the flag itself where it is
    not --FIELD-NAME, the one recovery mode it works on ("live" or "restart"; None: both), and
    `parse`, the flag's argument type where the field's own type does not say it (e.g. a count or
    'auto')."""
    if recovery and help:
        help = f"{help} [--recovery {recovery} only]"
    return {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "recovery": recovery,
            "parse": parse}


def setting(default, help: str | None = None, **options) -> Field:
    """A TrainConfig field: its default and its command-line flag (options as for flag_options)."""
    return field(default=default, metadata=flag_options(help, **options))


def workers_count(text: str) -> int | str:
    """--workers: a count, or 'auto' (resolved by the train command, TrainConfig.resolved_workers)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'auto' (got {text!r})") from None


# A help text that already says its default (in words or with %(default)s) is left as it is.
_STATES_DEFAULT = re.compile(r"\(default|\bdefault[:)]|\bdefault \S|%\(default\)")


def help_with_default(help: str | None, default: object) -> str | None:
    """The help text with "(default X)" added, unless there is no default to show or it says it already."""
    if default is None or default is False or default == [] or default is argparse.SUPPRESS:
        return help
    if help and _STATES_DEFAULT.search(help):
        return help
    return f"{help} (default %(default)s)" if help else "default %(default)s"


def split_sync(spec: str, alone: bool = False) -> dict:
    """A sync mode as scale and bench list it, MODE then optionally :int8|int4 (--quantize), :fN
    (--fragments) and :oT (--overlap), as TrainConfig's fields; a part it cannot read is kept as the
    quantize value, which the caller refuses. `alone`: a single worker, which sends nothing, gets none of
    the options."""
    mode, *options = spec.split(":")
    fields = {"sync": mode, "quantize": "none", "fragments": 1, "overlap": 0}
    for option in options:
        if option[:1] in ("f", "o") and option[1:].isdigit():
            fields["fragments" if option[0] == "f" else "overlap"] = int(option[1:])
        else:
            fields["quantize"] = option if fields["quantize"] == "none" else f"{fields['quantize']}:{option}"
    return {"sync": mode} if alone else fields


def check_sync_every(value: str) -> None:
    """--sync-every is a step count >= 1 or 'epoch' (for train and for the scale grid)."""
    if value != "epoch" and not (value.isdigit() and int(value) >= 1):
        raise UserError(f"--sync-every must be a step count >= 1 or 'epoch' (got {value!r})")


def steps_per_round(sync_every: str, fragments: int = 1) -> int:
    """Local steps between synchronisations: K (H), or H/F under Streaming DiLoCo, a fragment a round."""
    return int(sync_every) // fragments


def steps_this_round(steps_left: int, most: int) -> int:
    """The steps of a round that starts `steps_left` steps before the epoch's end: the rest of the epoch
    cut into as few rounds of at most `most` steps as it takes (as many as cutting every `most` steps),
    as even as they go, the longer first (so a short round, if any, is the epoch's last, which sends
    every fragment at its end anyway and has nothing to overlap). An epoch of 49 steps at K = 24 runs
    17, 16 and 16 steps between synchronisations, not 24, 24 and 1: the same bytes, the longest drift
    a third shorter."""
    rounds = max(1, -(-steps_left // most))
    return max(1, -(-steps_left // rounds))


def check_fragments(sync: str, sync_every: str | None, fragments: int) -> None:
    """--fragments F: DiLoCo's, and its H a multiple of F, so that the fragments' rounds stagger evenly."""
    if fragments < 1:
        raise UserError(f"--fragments must be at least 1 (got {fragments})")
    if sync != "diloco":
        raise UserError(f"--fragments {fragments} applies to --sync diloco (Streaming DiLoCo), not {sync}")
    if not (sync_every or "").isdigit() or int(sync_every) % fragments:
        raise UserError(f"--fragments {fragments} needs --sync-every H a multiple of it, so that one fragment "
                        f"is synchronised every H/F steps (got {sync_every})")


def check_overlap(sync: str, sync_every: str | None, fragments: int, overlap: int, mix: float) -> None:
    """--overlap T: DiLoCo's, T inner steps inside a round of H/F, and a mix in [0, 1]."""
    if sync != "diloco":
        raise UserError(f"--overlap {overlap} applies to --sync diloco, not {sync}")
    round_steps = steps_per_round(sync_every, fragments) if (sync_every or "").isdigit() else 0
    if not 0 < overlap < round_steps:
        raise UserError(f"--overlap must be between 1 and a round's steps less one, H/F - 1 = {round_steps - 1} "
                        f"(got {overlap})")
    if not 0.0 <= mix <= 1.0:
        raise UserError(f"--overlap-mix must be in [0, 1] (got {mix})")


# --- The sections. Each one's fields, in the order --help lists them, and its own checks. ---

@dataclass
class DataSettings:
    """Where the images come from, and which share of them trains."""

    TITLE = "data"

    data: str = field(metadata=flag_options("image folder, CIFAR-10 batches (folder or .tar.gz), a .csv/.tsv "
                                            "list (path,label[,split]), an .npz (images, labels[, test_images, "
                                            "test_labels, classes]) or a prepared folder; default: download the "
                                            "official CIFAR-10"))
    val_fraction: float = setting(0.0, "seeded share of the training set held out for validation (default 0)")
    # A seeded share of the training set (after the validation split): `distvision scale` varies it.
    train_fraction: float = setting(1.0, "train on this seeded share of the training set (default 1: all of it)")
    image_size: int = setting(32, "side in pixels the images are resized to (square)")
    cache_dir: str | None = setting(None, "where prepared data is cached (default ~/.cache/distvision)")
    data_on_device: str = setting("auto", "keep the images on the training device and gather and augment batches "
                                  "there (auto: on a GPU, when they fit)", choices=("auto", "on", "off"))

    def check_data(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        if not 0.0 < self.train_fraction <= 1.0:
            raise UserError(f"--train-fraction must be in (0, 1] (got {self.train_fraction})")
        if self.image_size < 8:
            raise UserError(f"--image-size must be at least 8 (got {self.image_size})")


@dataclass
class RecipeSettings:
    """The model, its recipe, and the user's overrides of the recipe (None: the recipe's value)."""

    TITLE = "model and recipe"

    model: str = setting("caffe-quick", "a model from `distvision models`, or your own: package.module:function "
                         "or path/to/file.py:function (default %(default)s)")
    recipe: str = setting("default", "the model's recipe: 'default' or a named one, e.g. 'caffe' for Caffe's "
                          "exact solver, or a TOML file of recipe fields laid over the default")
    epochs: int | None = setting(None, f"epochs {RECIPE_NOTE}")  # the most: stopping may end a run earlier
    batch_size: int | None = setting(None, f"global batch size, split across workers {RECIPE_NOTE}")
    lr: float | None = setting(None, f"learning rate for the global batch {RECIPE_NOTE}")
    momentum: float | None = setting(None, f"SGD momentum {RECIPE_NOTE}")
    weight_decay: float | None = setting(None, f"weight decay {RECIPE_NOTE}")
    label_smoothing: float | None = setting(None, f"label smoothing {RECIPE_NOTE}")
    recipe_settings: list[str] = field(default_factory=list, metadata=flag_options(
        "override any recipe field, e.g. --set cutout=8 --set 'schedule=[[0,1],[1,0]]'", flag="--set",
        metavar="FIELD=VALUE"))
    # Tricks switched off (recipes.TRICK_SWITCHES), one --no-TRICK flag each.
    disable: list[str] = field(default_factory=list, metadata=flag_options(flag="--no-TRICK"))
    precision: str = setting("auto", "auto: measure once which is faster here (cached)",
                             choices=("auto", "bf16", "fp32"))
    # Off by default: measured once faster on one CPU, no gain on another (benchmarks/RESULTS.md).
    compile: str = setting("off", "torch.compile the model (in place: checkpoints keep their names)",
                           choices=("on", "off"))
    seed: int = setting(0, "seed of the initial weights, the data order, the augmentation and the splits")

    def check_recipe(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise UserError(f"--epochs must be at least 1 (got {self.epochs})")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"--lr must be positive (got {self.lr})")


@dataclass
class ParallelSettings:
    """Workers, synchronisation (parallel/sync.py) and batch balancing (parallel/balance.py)."""

    TITLE = "workers, synchronisation and batch balancing"

    # 'auto' is resolved by the train command before anything else reads it (resolved_workers).
    workers: int = setting(2, "local worker processes, or auto: one per GPU on a CUDA machine, else one per "
                           "--threads-per-worker cores (one per core when that is not given) (default "
                           "%(default)s); ignored under torchrun", metavar="N|auto", parse=workers_count)
    # None: the machine's cores split over the local workers. Fixed by `distvision scale`, so that
    # every worker count gets the same resources per worker.
    threads_per_worker: int | None = setting(None, "threads of each worker (default: the cores split over the "
                                             "local workers)")
    device: str = setting("auto", "auto: CUDA when a GPU is visible, else the CPU", choices=("auto", "cpu", "cuda"))
    sync: str = setting("allreduce", "allreduce: gradients averaged every step (default); local-sgd: local steps, "
                        "replicas averaged every --sync-every steps (Dahl et al.'s Pattern Parallel Training); "
                        "diloco: local steps, then an outer Nesterov step on the averaged change (--recovery live)",
                        choices=SYNC_MODES)
    sync_every: str | None = setting(None, "local-sgd, diloco: optimizer steps between averagings, or 'epoch' "
                                     f"(local-sgd's default {DEFAULT_SYNC_EVERY}; diloco needs it)", metavar="K|epoch")
    sync_warmup: int = setting(0, "local-sgd: all-reduce every step for the first S steps (default %(default)s)",
                               metavar="S")  # post-local SGD
    compress: str = setting("none", "allreduce: gradients exchanged in half precision or PowerSGD's low-rank "
                            "approximation (default %(default)s)", choices=("none", "fp16", "bf16", "powersgd"))
    powersgd_rank: int = setting(2, "--compress powersgd: the rank of its approximation (default %(default)s)")
    lr_scaling: str = setting("none", "scale the lr given for --base-batch-size to the global batch (Goyal et al.)",
                              choices=("none", "linear", "sqrt"))
    base_batch_size: int | None = setting(None, "batch size the lr is given for (default: the recipe's)")
    # On top of the recipe's schedule.
    warmup_epochs: float = setting(0.0, "linear lr warmup over the first epochs (default %(default)s)")
    balance: str = setting("even", "throughput: split each global batch across workers in proportion to measured "
                           "speed (default %(default)s)", choices=("even", "throughput"))
    sync_bn: bool = setting(False, "batch-norm statistics over all workers (CUDA only; default: per worker)",
                            recovery="restart")
    # The DiLoCo paper's outer optimizer (Douillard et al. 2023): Nesterov SGD, lr 0.7, momentum 0.9.
    outer_lr: float = setting(0.7, "diloco: the outer optimizer's lr (default %(default)s)")
    outer_momentum: float = setting(0.9, "diloco: the outer optimizer's Nesterov momentum (default %(default)s)")
    quantize: str = setting("none", "local-sgd, diloco: each replica's change over a round sent as int8 or int4 "
                            "codes (a scale per 128 values, error feedback), gathered instead of summed",
                            choices=("none", "int8", "int4"), recovery="live")
    fragments: int = setting(1, "diloco: Streaming DiLoCo, the model in F fragments of consecutive layers, one "
                             "synchronised every H/F steps in turn (so each every H), all of them at an epoch's "
                             "end (default %(default)s: the whole model every H)", metavar="F",
                             recovery="live")
    overlap: int = setting(0, "diloco: a round's exchange starts this many inner steps before the round ends, "
                           "which run while it is in flight; then the synchronised weights are mixed with "
                           "the ones those steps reached (Streaming DiLoCo's overlap; below H/F)", metavar="T",
                           recovery="live")
    overlap_mix: float = setting(0.5, "--overlap: the share of the local weights in that mix, alpha (default "
                                 "%(default)s, the paper's; 0 takes the synchronised weights)", metavar="ALPHA",
                                 recovery="live")

    @property
    def period(self) -> str:
        """Steps between averagings (local-sgd, diloco), or 'epoch'."""
        return self.sync_every or DEFAULT_SYNC_EVERY

    def check_parallel(self) -> None:
        if self.workers != "auto" and self.workers < 1:
            raise UserError(f"--workers must be at least 1 (got {self.workers})")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise UserError(f"--threads-per-worker must be at least 1 (got {self.threads_per_worker})")
        if self.sync_every is not None:
            check_sync_every(self.sync_every)
        if self.sync == "diloco" and self.sync_every is None:
            raise UserError("--sync diloco needs --sync-every H, the inner steps between outer steps (e.g. 32)")
        if not 0.0 < self.outer_lr or not 0.0 <= self.outer_momentum < 1.0:
            raise UserError(f"--outer-lr must be positive and --outer-momentum in [0, 1) "
                            f"(got {self.outer_lr}, {self.outer_momentum})")
        if self.sync_warmup < 0:
            raise UserError(f"--sync-warmup must be >= 0 (got {self.sync_warmup})")
        if self.compress != "none" and self.sync != "allreduce":
            raise UserError(f"--compress {self.compress} applies to --sync allreduce only")
        if self.quantize != "none" and self.sync == "allreduce":
            raise UserError(f"--quantize {self.quantize} applies to the changes of --sync local-sgd or diloco; "
                            "for gradients every step use --compress fp16 or bf16")
        if self.fragments != 1:
            check_fragments(self.sync, self.sync_every, self.fragments)
        if self.overlap:
            check_overlap(self.sync, self.sync_every, self.fragments, self.overlap, self.overlap_mix)
        if self.powersgd_rank < 1:
            raise UserError(f"--powersgd-rank must be at least 1 (got {self.powersgd_rank})")
        if self.base_batch_size is not None and self.base_batch_size < 1:
            raise UserError(f"--base-batch-size must be at least 1 (got {self.base_batch_size})")
        if self.warmup_epochs < 0:
            raise UserError(f"--warmup-epochs must be >= 0 (got {self.warmup_epochs})")
        if self.sync_bn and self.device == "cpu":
            raise UserError("--sync-bn needs CUDA: torch's SyncBatchNorm does not run on the CPU; "
                            "leave it off (per-worker statistics)")


@dataclass
class StoppingSettings:
    """Stopping criteria (parallel/stopping.py), agreed by every worker; --epochs is the maximum."""

    TITLE = "stopping (every worker stops at the same step)"

    target_accuracy: float | None = setting(None, "stop at the first epoch reaching this accuracy")
    patience: int | None = setting(None, "stop after N epochs without improvement")  # of more than min_delta
    min_delta: float = setting(0.0, "smallest accuracy gain that counts as an improvement (default %(default)s)")
    monitor: str = setting("test", "accuracy that --target-accuracy and --patience watch (default %(default)s)",
                           choices=("test", "val"))
    # Across resumes; evaluation excluded.
    max_time: float | None = setting(None, "stop after this many seconds of training")

    def check_stopping(self) -> None:
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise UserError(f"--target-accuracy is a fraction in (0, 1] (got {self.target_accuracy})")
        if self.patience is not None and self.patience < 1:
            raise UserError(f"--patience must be at least 1 epoch (got {self.patience})")
        if self.max_time is not None and self.max_time <= 0:
            raise UserError(f"--max-time must be positive (got {self.max_time})")


@dataclass
class FaultToleranceSettings:
    """The run folder, and how the job survives a dead worker: checkpoints, restarts, timeouts."""

    TITLE = "run folder and fault tolerance"

    out: str | None = setting(None, "run folder (default runs/<model>-<time>)")
    resume: bool = setting(False, "continue the unfinished run in --out")
    # A collective waits at most this long for a peer (then the group restarts) instead of torch's
    # 30-minute default.
    collective_timeout: float = setting(120.0, "seconds a collective waits for a peer before the group restarts "
                                        "(default %(default)s)")
    checkpoint_every: float = setting(60.0, "seconds of training between checkpoints; also at every epoch end "
                                      "(default %(default)s)")
    max_restarts: int = setting(3, "restarts of the local worker group after a worker dies (default %(default)s)")
    join_timeout: float = setting(600.0, "seconds to wait for the workers at rendezvous before failing "
                                  "(default %(default)s)")
    # live: torchft keeps the survivors training and heals a (re)started worker from a live peer.
    # restart: a dead worker makes torch's elastic agent restart every worker from the newest checkpoint.
    recovery: str = setting("auto", "after a worker dies: live: the others train on, a respawned or new worker "
                            "joins from a live peer (torchft); restart: every worker restarts from the newest "
                            "checkpoint; auto (default): live for several local workers on the CPU or with "
                            "--lighthouse, restart for one worker, on GPUs, under torchrun without --lighthouse, or "
                            "with a restart-only setting", choices=RECOVERY_MODES)
    lighthouse: str | None = setting(None, "live, on several machines: the torchft Lighthouse to join "
                                     "(HOST:PORT; default: the command starts one on loopback)", metavar="HOST:PORT",
                                     recovery="live")
    heartbeat_timeout: float = setting(0.35, "live, one machine: seconds without a worker's heartbeat (every "
                                       "0.1 s) before the others go on without it (default %(default)s; several "
                                       "machines: the Lighthouse's --heartbeat_timeout_ms)")
    quorum_every: int = setting(8, "live, averaging gradients: steps between quorums, where workers join "
                                "(default %(default)s); a failure starts a new one at once")
    lighthouse_grace: float = setting(60.0, "live: seconds the workers wait for a Lighthouse that stopped "
                                      "answering (training on until a quorum is due; a restarted one is joined "
                                      "again) before they stop resumably (default %(default)s)",
                                      recovery="live")
    bind: str | None = setting(None, "live: the address this worker's servers listen on (default: loopback for a "
                               "local job; with --lighthouse, the interface that reaches the Lighthouse)",
                               metavar="HOST", recovery="live")
    secret_file: str | None = setting(None, "live, on several machines: a file (mode 600) holding the job's shared "
                                      "secret, which authenticates healing (default: $DISTVISION_SECRET; a local "
                                      "job makes its own)", metavar="FILE", recovery="live")

    def check_fault_tolerance(self) -> None:
        if self.out and Path(self.out).exists() and not Path(self.out).is_dir():
            raise UserError(f"--out {self.out} is a file; give a folder for the run's outputs")
        if self.out and (Path(self.out) / "summary.json").exists():
            raise UserError(f"--out {self.out} already holds a finished run; choose another folder")
        if self.checkpoint_every <= 0:
            raise UserError(f"--checkpoint-every must be positive (got {self.checkpoint_every})")
        if self.max_restarts < 0:
            raise UserError(f"--max-restarts must be 0 or more (got {self.max_restarts})")
        if self.quorum_every < 1:
            raise UserError(f"--quorum-every must be at least 1 (got {self.quorum_every})")
        if self.heartbeat_timeout <= 0:
            raise UserError(f"--heartbeat-timeout must be positive (got {self.heartbeat_timeout})")
        if self.lighthouse_grace <= 0:
            raise UserError(f"--lighthouse-grace must be positive (got {self.lighthouse_grace})")


@dataclass
class DebugSettings:
    """Debugging aids for tests and demonstrations: they make a run slow, fail or stop on purpose."""

    TITLE = "debugging"

    audit_samples: bool = setting(False, "log each rank's sample indices per step to RUN_DIR/audit/")
    debug_stop_at_step: int | None = setting(None, "stop resumably at the first exchange of losses and votes from "
                                             "this step on, as on SIGTERM")
    debug_step_delay: float = setting(0.0, "sleep after every step (seconds)")
    debug_slowdown: str | None = setting(None, "make one worker FACTOR times slower (sleeps in proportion to its "
                                         "compute)", metavar="RANK:FACTOR")
    debug_nan_at: str | None = setting(None, "make one worker's loss NaN at a global step", metavar="RANK:STEP")
    debug_faults: list[str] = field(default_factory=list, metadata=flag_options(
        "a fault at a phase of a step, once per run folder (repeatable): KIND kill, term, stop (3 s) or hang "
        "(its heartbeat beating) by whoever holds RANK, at the first PHASE from global step STEP on: step "
        "(after it; the default), exchange (the round's all-reduce in flight), eval (the epoch's evaluation) "
        "or heal (serving a healing peer); KIND lighthouse: the command restarts its Lighthouse once a "
        "worker has reported step STEP (RANK 0, PHASE step)", flag="--debug-fault", metavar="KIND:RANK:STEP[:PHASE]",
        recovery="live"))
    debug_corrupt_at: str | None = setting(None, "change one worker's weights after a global step, silently "
                                           "(once per run folder)", metavar="RANK:STEP", recovery="live")

    def check_debug(self) -> None:
        for flag, value, minimum in (("--debug-slowdown", self.debug_slowdown, 1.0),
                                     ("--debug-nan-at", self.debug_nan_at, 0.0),
                                     ("--debug-corrupt-at", self.debug_corrupt_at, 0.0)):
            if value is None:
                continue
            parts = value.split(":")
            try:
                rank, number = int(parts[0]), float(parts[1])
            except (IndexError, ValueError):
                raise UserError(f"{flag} takes RANK:NUMBER, e.g. 1:2 (got {value!r})") from None
            if rank < 0 or number < minimum or len(parts) != 2:
                raise UserError(f"{flag} needs RANK >= 0 and a number >= {minimum:g} (got {value!r})")
        for value in self.debug_faults:
            kind, *numbers = value.split(":")
            phase = numbers.pop() if len(numbers) == 3 else "step"
            if (kind not in FAULT_KINDS or phase not in FAULT_PHASES or len(numbers) != 2
                    or not all(number.isdigit() for number in numbers)):
                raise UserError(f"--debug-fault takes KIND:RANK:STEP[:PHASE], KIND one of {', '.join(FAULT_KINDS)}, "
                                f"PHASE one of {', '.join(FAULT_PHASES)} (got {value!r})")


SECTIONS = (DataSettings, RecipeSettings, ParallelSettings, StoppingSettings, FaultToleranceSettings, DebugSettings)


# A dataclass takes its bases' fields last base first: listed in reverse, the fields (and so
# summary.json's "config" and --help) run data, recipe, parallel, stopping, fault tolerance, debug.
@dataclass
class TrainConfig(DebugSettings, FaultToleranceSettings, StoppingSettings, ParallelSettings, RecipeSettings,
                  DataSettings):
    """Every setting of one training run, read flat (config.sync, config.max_time) by the training loop."""

    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"{self.model}-{time.strftime('%Y%m%d-%H%M%S')}"

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Reject settings that cannot work, with a message that says what to change."""
        for check in (self.check_data, self.check_recipe, self.check_parallel, self.check_stopping,
                      self.check_fault_tolerance, self.check_debug):
            check()
        # Settings that depend on two sections.
        if self.monitor == "val" and self.val_fraction <= 0:
            raise UserError("--monitor val needs a validation split: add --val-fraction, e.g. 0.1")
        self.check_recovery()

    def check_recovery(self) -> None:
        """Settings that work on one recovery mode only fail on the other (the table's `recovery` key)."""
        mode = self.recovery
        if self.sync == "diloco" and mode == "restart":
            raise UserError("--sync diloco runs on torchft's live membership: use --recovery live (or auto)")
        if mode == "auto":
            return
        for name, only in self.mode_only_settings().items():
            if only != mode:
                raise UserError(f"{_flag(CONFIG_FILE_FIELDS[name])} {getattr(self, name)} works with --recovery "
                                f"{only} only: drop it or use --recovery {only}")

    def mode_only_settings(self) -> dict[str, str]:
        """The settings given (not at their default) that work on one recovery mode only, with that mode."""
        given = {}
        for name, only in RECOVERY_ONLY.items():
            if getattr(self, name) != _default(CONFIG_FILE_FIELDS[name]):
                given[name] = only
        return given

    def resolved_workers(self, gpu_count: int, cores: int) -> int:
        """The worker count `auto` stands for here: one per GPU on a CUDA machine (unless --device cpu),
        else one per --threads-per-worker cores (one per core when that is not given)."""
        if self.workers != "auto":
            return self.workers
        if self.device != "cpu" and gpu_count > 0:
            return gpu_count
        return max(1, cores // (self.threads_per_worker or 1))

    def resolved_recovery(self, under_torchrun: bool, on_gpu: bool = False) -> str:
        """The recovery mode `auto` stands for here: live for several local workers (or a given
        Lighthouse, or DiLoCo), restart for one worker (no membership to keep), under torchrun without a
        Lighthouse (torchrun's own restarts), on GPUs (live membership is tested on the CPU only), or
        when a restart-only setting is given."""
        if self.recovery != "auto":
            return self.recovery
        if self.lighthouse or self.sync == "diloco":
            return "live"
        if under_torchrun or self.workers == 1 or on_gpu:
            return "restart"
        return "restart" if "restart" in self.mode_only_settings().values() else "live"

    def to_argv(self) -> list[str]:
        """The `distvision train` flags that give these settings (those left at their default are omitted)."""
        argv: list[str] = []
        for field_ in fields(self):
            value, flag = getattr(self, field_.name), _flag(field_)
            if field_.name == "disable":
                argv += [f"--no-{trick}" for trick in value]
            elif isinstance(value, list):
                argv += [item for entry in value for item in (flag, entry)]
            elif value is None or value == field_.default:
                continue
            elif isinstance(value, bool):
                argv.append(flag)
            else:
                argv += [flag, str(value)]
        return argv

    @classmethod
    def from_argv(cls, argv: list[str], base: TrainConfig | None = None) -> TrainConfig:
        """The settings `distvision train <argv>` runs with; base's values stand where argv sets nothing."""
        parser = _RaisingParser(prog="distvision train", add_help=False)
        add_train_arguments(parser, base.to_dict() if base else None)
        return cls.from_namespace(parser.parse_args(argv))

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> TrainConfig:
        """The settings in parsed arguments (a namespace from add_train_arguments' flags, and perhaps others)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"train settings: {message}")


def _flag(field_: Field) -> str:
    return field_.metadata.get("flag") or f"--{field_.name.replace('_', '-')}"


def _value_type(field_: Field) -> str:
    """The field's type as written, without "| None": int, float, str, bool or list[str]."""
    return str(field_.type).replace(" | None", "")


def _default(field_: Field) -> object:
    return field_.default_factory() if field_.default is MISSING else field_.default


def add_train_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """Add every TrainConfig setting to parser as a flag, in one group per section; `defaults` (e.g.
    from `train --config FILE`) replace the dataclass defaults."""
    for section in SECTIONS:
        group = parser.add_argument_group(section.TITLE)
        for field_ in fields(section):
            if field_.name == "disable":
                _add_trick_switches(parser)
                continue
            meta = field_.metadata
            default = [] if field_.default is MISSING else field_.default  # lists are new on every parse
            if field_.name == "data":
                default = None  # required by the dataclass, optional on the command line
            options = {"dest": field_.name, "help": meta["help"]}  # the CLI adds the default (cli._show_defaults)
            kind = _value_type(field_)
            if kind == "bool":
                options["action"] = "store_true"
            elif kind == "list[str]":
                options["action"] = "append"
            elif meta.get("parse"):
                options["type"] = meta["parse"]
            elif kind != "str":
                options["type"] = {"int": int, "float": float}[kind]
            for key in ("choices", "metavar"):
                if meta[key]:
                    options[key] = meta[key]
            group.add_argument(_flag(field_), default=default, **options)
    if defaults:
        parser.set_defaults(**defaults)


def _add_trick_switches(parser: argparse.ArgumentParser) -> None:
    tricks = parser.add_argument_group("switching off the recipe's tricks (for ablations)")
    for name, fields_set in TRICK_SWITCHES.items():
        tricks.add_argument(f"--no-{name}", dest="disable", action="append_const", const=name, default=[],
                            help=f"recipe fields: {', '.join(f'{k}={v}' for k, v in fields_set.items())}")


# --- Config files (`distvision train --config FILE`; RUN_DIR/config.toml; a tune's best.toml) ---
CONFIG_FILE_FIELDS = {f.name: f for f in fields(TrainConfig)}
# The settings that work on one recovery mode only, from the table (checks and help text read it).
RECOVERY_ONLY = {name: f.metadata["recovery"] for name, f in CONFIG_FILE_FIELDS.items() if f.metadata.get("recovery")}
_FIELD_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "list[str]": list}
# Where a run goes and whether it continues: a config file reproduces a run in a new folder.
RUN_FOLDER_SETTINGS = ("out", "resume")


def config_key(field_: Field) -> str:
    """A setting's key in a config file: its flag without the dashes (batch-size, set, debug-fault); the
    --no-TRICK switches are one list, `disable`."""
    return "disable" if field_.name == "disable" else _flag(field_).removeprefix("--")


# Keys read: the flag names, and the older spellings (field names, and field names with dashes).
_FILE_KEYS = {key: f for f in CONFIG_FILE_FIELDS.values()
              for key in (config_key(f), f.name, f.name.replace("_", "-"))}


def read_toml(path: Path, flag: str) -> dict:
    """A TOML file's content; unreadable or invalid is a UserError naming the flag that gave it."""
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot read it ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{flag} {path}: not valid TOML ({error})") from None


def read_config_file(path: Path) -> dict:
    """TrainConfig values (by field name) from a TOML file keyed by flag names (batch-size) or by the
    older field names (batch_size); unknown keys, a setting given twice or a wrong type is a UserError."""
    values: dict = {}
    for key, value in read_toml(path, "--config").items():
        field_ = _FILE_KEYS.get(key)
        if field_ is None:
            known = ", ".join(config_key(f) for f in CONFIG_FILE_FIELDS.values())
            raise UserError(f"--config {path}: unknown setting {key!r}; known: {known}")
        if field_.name in values:
            raise UserError(f"--config {path}: {key} sets {config_key(field_)} a second time")
        values[field_.name] = _checked_file_value(path, key, value, field_)
    return values


def _checked_file_value(path: Path, key: str, value: object, field_: Field) -> object:
    parse = field_.metadata.get("parse")
    if parse and isinstance(value, str):  # e.g. workers = "auto"
        try:
            return parse(value)
        except argparse.ArgumentTypeError as error:
            raise UserError(f"--config {path}: {key}: {error}") from None
    expected = _FIELD_TYPES[_value_type(field_)]
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
        raise UserError(f"--config {path}: {key} = {value!r} has the wrong type ({field_.type})")
    if expected is list and not all(isinstance(item, str) for item in value):
        raise UserError(f"--config {path}: {key} must be a list of strings")
    return value


def config_file_values(config: TrainConfig) -> dict:
    """The settings a config file keeps to reproduce a run: all of them but the run folder's (out, resume)."""
    return {name: value for name, value in config.to_dict().items() if name not in RUN_FOLDER_SETTINGS}


def config_toml(values: dict, comment: str = "") -> str:
    """TrainConfig values (by field name) as TOML keyed by flag names, readable by read_config_file;
    unset (None) values are left out."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    for name, value in values.items():
        if value is not None:
            lines.append(f"{config_key(_FILE_KEYS[name])} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def write_config_file(path: Path, values: dict, comment: str = "") -> None:
    """Write TrainConfig values as a TOML config file (config_toml), atomically."""
    write_text_atomic(Path(path), config_toml(values, comment))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")
