"""Run settings as a dataclass: the single source of the defaults the CLI shows."""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from distvision.errors import UserError


@dataclass
class TrainConfig:
    data: str
    model: str = "caffe-quick"
    recipe: str = "default"  # or a model's named alternative, e.g. "caffe"
    workers: int = 2  # local worker processes when not started by torchrun
    # None means: take the value from the model's recipe.
    epochs: int | None = None
    batch_size: int | None = None  # global, split across workers
    lr: float | None = None  # for the global batch
    momentum: float | None = None
    weight_decay: float | None = None
    label_smoothing: float | None = None
    recipe_settings: list[str] = field(default_factory=list)  # "field=value" for any recipe field
    disable: list[str] = field(default_factory=list)  # tricks switched off (recipes.TRICK_SWITCHES)
    sync_bn: bool = False  # batch-norm statistics over all workers (torch's SyncBatchNorm: CUDA only)
    precision: str = "auto"
    device: str = "auto"
    # Synchronisation (parallel/sync.py) and batch balancing (parallel/balance.py).
    sync: str = "allreduce"  # or "local-sgd"
    sync_every: str = "8"  # local-sgd: average the replicas every K optimizer steps, or "epoch"
    sync_warmup: int = 0  # local-sgd: plain all-reduce for the first S steps (post-local SGD)
    compress: str = "none"  # allreduce: none | fp16 | bf16 | powersgd
    powersgd_rank: int = 2
    lr_scaling: str = "none"  # none | linear | sqrt: scale the lr given for base_batch_size to the global batch
    base_batch_size: int | None = None  # default: the recipe's batch size
    warmup_epochs: float = 0.0  # linear lr warmup over the first epochs, on top of the schedule
    balance: str = "even"  # or "throughput": per-worker batch shares follow measured speed
    # Stopping criteria (parallel/stopping.py); --epochs is the maximum.
    target_accuracy: float | None = None
    patience: int | None = None  # epochs without an improvement of more than min_delta
    min_delta: float = 0.0
    monitor: str = "test"  # which accuracy target and patience watch: test | val
    max_time: float | None = None  # seconds of training (evaluation excluded), across resumes
    seed: int = 0
    val_fraction: float = 0.0
    # A seeded share of the training set (after the validation split): `distvision scale` varies it.
    train_fraction: float = 1.0
    # Threads each worker uses; None: the machine's cores split over the local workers. Fixed by
    # `distvision scale`, so that every worker count gets the same resources per worker.
    threads_per_worker: int | None = None
    image_size: int = 32
    out: str | None = None
    cache_dir: str | None = None
    # Fault tolerance. A collective waits at most this long for a peer (then the group restarts)
    # instead of torch's 30-minute default.
    collective_timeout: float = 120.0
    checkpoint_every: float = 60.0  # seconds of training between checkpoints (and at every epoch end)
    max_restarts: int = 3  # local worker-group restarts after a worker dies
    join_timeout: float = 600.0  # seconds to wait for the minimum number of workers at rendezvous
    resume: bool = False
    # Debugging aids for tests and demonstrations.
    audit_samples: bool = False  # log every rank's sample indices per step to RUN_DIR/audit/
    debug_stop_at_step: int | None = None  # stop (resumably) at the first stats exchange from this step on
    debug_step_delay: float = 0.0  # sleep this long after every step, to make a run slow
    debug_slowdown: str | None = None  # "RANK:FACTOR": that worker computes FACTOR times slower
    debug_nan_at: str | None = None  # "RANK:STEP": that worker's loss turns NaN at that global step

    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"{self.model}-{time.strftime('%Y%m%d-%H%M%S')}"

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Reject settings that cannot work, with a message that says what to change."""
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1 (got {self.workers})")
        if self.epochs is not None and self.epochs < 1:
            raise UserError(f"--epochs must be at least 1 (got {self.epochs})")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"--lr must be positive (got {self.lr})")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        if not 0.0 < self.train_fraction <= 1.0:
            raise UserError(f"--train-fraction must be in (0, 1] (got {self.train_fraction})")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise UserError(f"--threads-per-worker must be at least 1 (got {self.threads_per_worker})")
        if self.image_size < 8:
            raise UserError(f"--image-size must be at least 8 (got {self.image_size})")
        self._validate_parallel_settings()
        if self.out and Path(self.out).exists() and not Path(self.out).is_dir():
            raise UserError(f"--out {self.out} is a file; give a folder for the run's outputs")
        if self.out and (Path(self.out) / "summary.json").exists():
            raise UserError(f"--out {self.out} already holds a finished run; choose another folder")
        if self.checkpoint_every <= 0:
            raise UserError(f"--checkpoint-every must be positive (got {self.checkpoint_every})")
        if self.max_restarts < 0:
            raise UserError(f"--max-restarts must be 0 or more (got {self.max_restarts})")
        if self.sync_bn and self.device == "cpu":
            raise UserError("--sync-bn needs CUDA: torch's SyncBatchNorm does not run on the CPU; "
                            "leave it off (per-worker statistics)")

    def _validate_parallel_settings(self) -> None:
        if self.sync_every != "epoch" and not (self.sync_every.isdigit() and int(self.sync_every) >= 1):
            raise UserError(f"--sync-every must be a step count >= 1 or 'epoch' (got {self.sync_every!r})")
        if self.sync_warmup < 0:
            raise UserError(f"--sync-warmup must be >= 0 (got {self.sync_warmup})")
        if self.compress != "none" and self.sync != "allreduce":
            raise UserError(f"--compress {self.compress} applies to --sync allreduce only")
        if self.powersgd_rank < 1:
            raise UserError(f"--powersgd-rank must be at least 1 (got {self.powersgd_rank})")
        if self.base_batch_size is not None and self.base_batch_size < 1:
            raise UserError(f"--base-batch-size must be at least 1 (got {self.base_batch_size})")
        if self.warmup_epochs < 0:
            raise UserError(f"--warmup-epochs must be >= 0 (got {self.warmup_epochs})")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise UserError(f"--target-accuracy is a fraction in (0, 1] (got {self.target_accuracy})")
        if self.patience is not None and self.patience < 1:
            raise UserError(f"--patience must be at least 1 epoch (got {self.patience})")
        if self.max_time is not None and self.max_time <= 0:
            raise UserError(f"--max-time must be positive (got {self.max_time})")
        if self.monitor == "val" and self.val_fraction <= 0:
            raise UserError("--monitor val needs a validation split: add --val-fraction, e.g. 0.1")
        for flag, setting, minimum in (("--debug-slowdown", self.debug_slowdown, 1.0),
                                       ("--debug-nan-at", self.debug_nan_at, 0.0)):
            if setting is None:
                continue
            parts = setting.split(":")
            try:
                rank, value = int(parts[0]), float(parts[1])
            except (IndexError, ValueError):
                raise UserError(f"{flag} takes RANK:NUMBER, e.g. 1:2 (got {setting!r})") from None
            if rank < 0 or value < minimum or len(parts) != 2:
                raise UserError(f"{flag} needs RANK >= 0 and a number >= {minimum:g} (got {setting!r})")

# --- Config files (`distvision train --config FILE`, written by `distvision tune` as best.toml) ---
CONFIG_FILE_FIELDS = {f.name: f for f in fields(TrainConfig)}
_FIELD_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "list[str]": list}


def read_toml(path: Path, flag: str) -> dict:
    """A TOML file's content; unreadable or invalid is a UserError naming the flag that gave it."""
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot read it ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{flag} {path}: not valid TOML ({error})") from None


def read_config_file(path: Path) -> dict:
    """TrainConfig values from a TOML file; unknown keys or wrong types are a UserError."""
    values = read_toml(path, "--config")
    for key, value in values.items():
        field_ = CONFIG_FILE_FIELDS.get(key)
        if field_ is None:
            raise UserError(f"--config {path}: unknown setting {key!r}; known: {', '.join(CONFIG_FILE_FIELDS)}")
        expected = _FIELD_TYPES[str(field_.type).replace(" | None", "")]
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise UserError(f"--config {path}: {key} = {value!r} has the wrong type ({field_.type})")
        if expected is list and not all(isinstance(item, str) for item in value):
            raise UserError(f"--config {path}: {key} must be a list of \"FIELD=VALUE\" strings")
    return values


def write_config_file(path: Path, values: dict, comment: str = "") -> None:
    """Write TrainConfig values as TOML (flat scalars and lists of strings), readable by read_config_file."""
    lines = [f"# {line}" for line in comment.splitlines()]
    for key, value in values.items():
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    Path(path).write_text("\n".join(lines) + "\n")


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
