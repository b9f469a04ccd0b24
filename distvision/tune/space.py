"""The search space: which recipe settings a trial varies, over which values.

Written as TOML, one table per setting, named after a recipe field (`distvision models` lists them):

    [lr]
    type = "log"            # log-uniform float: low, high
    low = 3e-4
    high = 1e-2
    [momentum]
    type = "float"          # uniform float: low, high, optional step
    low = 0.8
    high = 0.95
    [translate]
    type = "int"            # integer: low, high (inclusive), optional step
    low = 0
    high = 4
    [batch_size]
    type = "categorical"    # one of: choices
    choices = [50, 100, 200]

The grid sampler needs a finite set: float and log settings then also give `grid = [...]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import optuna

from distvision.config import read_toml
from distvision.errors import UserError
from distvision.recipes import Recipe

TYPES = ("int", "float", "log", "categorical")
# Recipe fields a trial can vary; epochs is the search's budget and schedule is not a scalar.
TUNABLE = {f.name: f for f in fields(Recipe) if f.name not in ("epochs", "schedule")}
# Settings that `distvision train` takes as flags; the rest go through its `--set FIELD=VALUE`.
TRAIN_FLAGS = ("batch_size", "lr", "momentum", "weight_decay", "label_smoothing")
# Allowed value ranges, [low, high), for the settings that have one.
LIMITS = {
    "lr": (0.0, math.inf), "weight_decay": (0.0, math.inf), "momentum": (0.0, 1.0),
    "label_smoothing": (0.0, 1.0), "batch_size": (1, math.inf), "translate": (0, 64), "cutout": (0, 64),
    "bias_lr_mult": (0.0, math.inf),
}


@dataclass(frozen=True)
class Dimension:
    """One setting of the search space."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple | None = None
    grid: tuple | None = None

    def suggest(self, trial: optuna.Trial):
        """The value this trial tries (trial.suggest_*)."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1))
        return trial.suggest_float(self.name, self.low, self.high, log=self.type == "log", step=self.step)

    def grid_values(self) -> list:
        """Every value the grid sampler tries."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.grid is None:
            raise UserError(f"search space: the grid sampler needs a finite set of values for {self.name}: "
                            "add grid = [...] to its table")
        return list(self.grid)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()
                if v is not None and k != "name"}


def default_space(recipe: Recipe) -> list[Dimension]:
    """A search around the model's own recipe: the space used without --space."""
    return [
        Dimension("lr", "log", low=recipe.lr / 10, high=recipe.lr * 3),
        Dimension("weight_decay", "log", low=max(recipe.weight_decay, 1e-5) / 10,
                  high=max(recipe.weight_decay, 1e-5) * 3),
        Dimension("momentum", "float", low=0.8, high=0.95),
        Dimension("batch_size", "categorical", choices=(recipe.batch_size // 2, recipe.batch_size,
                                                        recipe.batch_size * 2)),
        Dimension("label_smoothing", "float", low=0.0, high=0.2),
        Dimension("flip", "categorical", choices=(False, True)),
        Dimension("translate", "int", low=0, high=4),
    ]


def load_space(path: Path) -> list[Dimension]:
    """Read and check a search-space TOML file; anything wrong is a one-line UserError."""
    tables = read_toml(path, "--space")
    if not tables:
        raise UserError(f"--space {path}: no settings to search; add a table such as [lr]")
    return [parse_dimension(name, table, path) for name, table in tables.items()]


def parse_dimension(name: str, table, source) -> Dimension:
    """One checked Dimension from its TOML table."""
    where = f"--space {source}: [{name}]"
    if name not in TUNABLE:
        raise UserError(f"{where} is not a recipe setting; tunable: {', '.join(TUNABLE)}")
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table with a type, e.g. [{name}] type = \"float\" low = .. high = ..")
    kind = table.get("type")
    if kind not in TYPES:
        raise UserError(f"{where}: type must be one of {', '.join(TYPES)} (got {kind!r})")
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "step", "grid"}
    unknown = set(table) - allowed
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a {kind} setting takes "
                        f"{', '.join(sorted(allowed - {'type'}))}")
    value_type = str(TUNABLE[name].type)
    if kind == "categorical":
        choices = table.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: a categorical setting needs a non-empty list: choices = [...]")
        for choice in choices:
            _check_value(where, name, value_type, choice)
        return Dimension(name, kind, choices=tuple(choices))
    if value_type in ("bool", "str"):
        raise UserError(f"{where}: {name} is a {value_type} setting; use type = \"categorical\" with choices")
    if value_type == "int" and kind != "int":
        raise UserError(f"{where}: {name} is an integer setting; use type = \"int\" or \"categorical\"")
    low, high, step = table.get("low"), table.get("high"), table.get("step")
    for key, value in (("low", low), ("high", high)):
        if not _is_number(value):
            raise UserError(f"{where}: {key} must be a number (got {value!r})")
    if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise UserError(f"{where}: an int setting needs integer low and high")
    if not low < high:
        raise UserError(f"{where}: bad range, low ({low}) must be below high ({high})")
    if kind == "log" and low <= 0:
        raise UserError(f"{where}: a log setting needs low > 0 (got {low})")
    if step is not None and (not _is_number(step) or step <= 0 or kind == "log"):
        raise UserError(f"{where}: step must be a positive number, and log settings take none")
    for value in (low, high):
        _check_value(where, name, value_type, value)
    grid = table.get("grid")
    if grid is not None:
        if not isinstance(grid, list) or not grid or not all(_is_number(v) and low <= v <= high for v in grid):
            raise UserError(f"{where}: grid must be a list of numbers between low and high")
        grid = tuple(grid)
    return Dimension(name, kind, low=low, high=high, step=step, grid=grid)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_value(where: str, name: str, value_type: str, value) -> None:
    """A value the recipe field accepts: its type, and its range where it has one."""
    ok_type = {"bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
               "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
               "float": _is_number}[value_type](value)
    if not ok_type:
        raise UserError(f"{where}: {value!r} is not a valid {name} (a {value_type})")
    if name in LIMITS:
        low, high = LIMITS[name]
        if not low <= value < high or (name in ("lr", "batch_size") and value <= 0):
            raise UserError(f"{where}: {value!r} is out of range for {name} (allowed: {low} to {high})")
    if name == "preprocessing":
        Recipe(preprocessing=value)  # raises the recipe's own UserError for an unknown one


def train_settings(params: dict) -> dict:
    """A trial's parameters as TrainConfig values: flags where train has them, --set for the rest."""
    values = {name: params[name] for name in TRAIN_FLAGS if name in params}
    others = [f"{name}={_set_text(value)}" for name, value in params.items() if name not in TRAIN_FLAGS]
    if others:
        values["recipe_settings"] = others
    return values


def _set_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, str) else repr(value)
