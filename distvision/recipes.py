"""Training recipes: every setting of a model's default training, kept as data.

A recipe is the single source of truth for defaults: `distvision train` flags override its
fields one by one, and the recipe actually used is recorded in summary.json.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from distvision.errors import UserError


@dataclass(frozen=True)
class Recipe:
    epochs: int = 10
    batch_size: int = 512  # global, split across workers
    lr: float = 0.1  # for the global batch
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    # Decoupled: weight_decay is the decay per step and per 1024 samples of global batch, following
    # the schedule but not --lr, so tuning the lr leaves the regularisation alone (airbench94).
    # Coupled: plain SGD weight decay, multiplied by the learning rate.
    decoupled_weight_decay: bool = False
    # Learning-rate multiplier as piecewise-linear points (fraction of the run, multiplier);
    # a repeated fraction makes a step, as in Caffe's "multistep" policy.
    schedule: tuple[tuple[float, float], ...] = ((0.0, 1.0), (1.0, 1.0))
    bias_lr_mult: float = 1.0
    bias_decay: bool = True  # weight decay on biases and normalisation parameters
    label_smoothing: float = 0.0
    # "standardize": (x/255 - mean) / std per channel; "caffe": raw 0-255 minus the mean image.
    preprocessing: str = "standardize"
    translate: int = 0  # random translate with reflect padding, pixels
    flip: bool = False
    cutout: int = 0
    alternating_flip: bool = False  # with flip: mirror each image every other epoch (airbench94)
    test_time_flip: bool = False  # average predictions over the image and its mirror
    test_time_shift: bool = False  # and over 1-pixel shifts: final evaluation only, per-epoch ones stay plain
    # The record recipes' tricks (distvision/tricks.py).
    whiten: bool = False  # first conv set to patch-whitening filters from training images, frozen
    frozen_norm_scale: bool = False  # batch-norm scales fixed at 1; shifts learn at bias_lr_mult
    ema_every: int = 0  # lookahead: pull the weights to their moving average every N steps; 0 off

    def __post_init__(self):
        if self.preprocessing not in ("standardize", "caffe"):
            raise UserError(f"preprocessing must be 'standardize' or 'caffe', not {self.preprocessing!r}")
        if not self.schedule or any(len(point) != 2 for point in self.schedule):
            raise UserError("schedule must be a list of [fraction, multiplier] points")

    def with_overrides(self, **overrides) -> Recipe:
        """A copy with the given fields replaced; None values keep the recipe's value."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)

    def with_settings(self, settings: list[str]) -> Recipe:
        """A copy with "field=value" strings applied; values are JSON (numbers, true/false, lists)."""
        known = {f.name: f for f in fields(self)}
        values = {}
        for setting in settings:
            name, _, text = setting.partition("=")
            name = name.strip().replace("-", "_")
            if name not in known or not text:
                raise UserError(f"--set {setting!r}: expected FIELD=VALUE with FIELD one of {', '.join(known)}")
            try:
                value = json.loads(text)
            except ValueError:
                value = text  # a bare word, e.g. preprocessing=caffe
            values[name] = value
        try:
            return Recipe.from_dict({**self.to_dict(), **values})
        except (TypeError, ValueError) as error:
            raise UserError(f"--set: {error}") from None

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "schedule" in values:
            values["schedule"] = tuple(tuple(point) for point in values["schedule"])
        return cls(**values)


def read_recipe_file(path: Path, base: Recipe) -> Recipe:
    """A TOML file of recipe fields (dashes or underscores) laid over base; unknown fields are errors."""
    try:
        values = tomllib.loads(path.read_text())
    except OSError as error:
        raise UserError(f"--recipe {path}: cannot read it ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"--recipe {path}: not valid TOML: {error}") from None
    values = {key.replace("-", "_"): value for key, value in values.items()}
    known = {f.name for f in fields(Recipe)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"--recipe {path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return Recipe.from_dict({**base.to_dict(), **values})
    except (TypeError, ValueError) as error:
        raise UserError(f"--recipe {path}: {error}") from None


# What `--no-NAME` switches off, as the recipe fields it sets: the ablation switches.
TRICK_SWITCHES: dict[str, dict] = {
    "whiten": {"whiten": False},
    "frozen-bn": {"frozen_norm_scale": False},
    "bias-lr": {"bias_lr_mult": 1.0},
    "decoupled-wd": {"decoupled_weight_decay": False},
    "label-smoothing": {"label_smoothing": 0.0},
    "ema": {"ema_every": 0},
    "alt-flip": {"alternating_flip": False},
    "translate": {"translate": 0},
    "tta": {"test_time_flip": False, "test_time_shift": False},
}


def without_tricks(recipe: Recipe, names: list[str]) -> Recipe:
    """The recipe with the named tricks switched off."""
    unknown = [name for name in names if name not in TRICK_SWITCHES]
    if unknown:
        raise UserError(f"unknown trick(s) {', '.join(unknown)}; known: {', '.join(TRICK_SWITCHES)}")
    changes = {field: value for name in names for field, value in TRICK_SWITCHES[name].items()}
    return replace(recipe, **changes)


def lr_multiplier(schedule: tuple[tuple[float, float], ...], progress: float) -> float:
    """The schedule's multiplier at progress in [0, 1]; after a step point the later value wins."""
    previous_x, previous_y = schedule[0]
    if progress < previous_x:
        return previous_y
    for x, y in schedule[1:]:
        if progress < x:
            if x == previous_x:
                return y
            return previous_y + (y - previous_y) * (progress - previous_x) / (x - previous_x)
        previous_x, previous_y = x, y
    return previous_y


def one_cycle(peak_at: float = 0.2, final: float = 0.0) -> tuple[tuple[float, float], ...]:
    """Linear warm-up from 0 to 1 by peak_at, then linear decay to final."""
    return ((0.0, 0.0), (peak_at, 1.0), (1.0, final))


def step_down(at: float, factor: float) -> tuple[tuple[float, float], ...]:
    """Constant, then multiplied by factor from the fraction `at` on (Caffe's multistep)."""
    return ((0.0, 1.0), (at, 1.0), (at, factor), (1.0, factor))


__all__ = ["TRICK_SWITCHES", "Recipe", "lr_multiplier", "one_cycle", "read_recipe_file", "step_down", "without_tricks"]
