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
    precision: str = "auto"
    device: str = "auto"
    sync: str = "allreduce"
    seed: int = 0
    val_fraction: float = 0.0
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
    debug_stop_at_step: int | None = None  # stop (resumably) after this global step, as on SIGTERM
    debug_step_delay: float = 0.0  # sleep this long after every step, to make a run slow

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
        if self.image_size < 8:
            raise UserError(f"--image-size must be at least 8 (got {self.image_size})")
        if self.out and Path(self.out).exists() and not Path(self.out).is_dir():
            raise UserError(f"--out {self.out} is a file; give a folder for the run's outputs")
        if self.out and (Path(self.out) / "summary.json").exists():
            raise UserError(f"--out {self.out} already holds a finished run; choose another folder")
        if self.checkpoint_every <= 0:
            raise UserError(f"--checkpoint-every must be positive (got {self.checkpoint_every})")
        if self.max_restarts < 0:
            raise UserError(f"--max-restarts must be 0 or more (got {self.max_restarts})")


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
