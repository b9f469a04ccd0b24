"""The model registry: `@register_model(recipe)` on a builder, `create(name, ...)` to build one.

Besides the built-in models, a name can be a user's own builder: `package.module:function` or
`path/to/file.py:function` (imported on every worker, as uvicorn imports an app), or a name that an
installed package registers through the `distvision.models` entry-point group (as timm's plugins do).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distvision.errors import UserError
from distvision.recipes import Recipe, one_cycle, read_recipe_file

ENTRY_POINT_GROUP = "distvision.models"
# A user's model comes without a tuned recipe: SGD with Nesterov momentum, one cycle, no augmentation
# (flips and shifts do not suit every kind of image). Flags, --set and --recipe FILE.toml override it.
PLAIN_RECIPE = Recipe(epochs=10, batch_size=256, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                      schedule=one_cycle(0.2))


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    recipe: Recipe
    description: str
    # Extra named recipes, e.g. "caffe" for Caffe's exact solver.
    alternatives: dict[str, Recipe]
    # A user's builder: called with the arguments it takes, and its output's shape checked.
    user_supplied: bool = False


_REGISTRY: dict[str, ModelEntry] = {}
_USER_ENTRIES: dict[str, ModelEntry] = {}  # module:function names already imported, kept out of listings


def register_model(name: str, recipe: Recipe, description: str, alternatives: dict[str, Recipe] | None = None):
    """Decorator: register builder(num_classes, image_size, **kwargs) -> nn.Module under name."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelEntry(name, builder, recipe, description, alternatives or {})
        return builder

    return wrap


def get_entry(name: str) -> ModelEntry:
    """The model called name: built in, `module:function` / `file.py:function`, or an entry point."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        if name not in _USER_ENTRIES:
            _USER_ENTRIES[name] = _user_entry(name)
        return _USER_ENTRIES[name]
    _load_entry_points()
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}; "
                        "or your own as package.module:function or path/to/file.py:function")
    return _REGISTRY[name]


def list_models() -> list[ModelEntry]:
    """The built-in models and those installed packages register."""
    _load_entry_points()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def create(name: str, num_classes: int = 10, image_size: int = 32, **kwargs) -> nn.Module:
    """Build a model; layers that depend on the input size follow image_size."""
    entry = get_entry(name)
    if not entry.user_supplied:
        return entry.builder(num_classes=num_classes, image_size=image_size, **kwargs)
    return _checked_user_model(entry, num_classes, image_size, **kwargs)


def recorded_name(name: str) -> str:
    """The name a checkpoint records: a user's file made absolute, so evaluate and classify find it from
    any folder; every other name as given."""
    module, _, function = name.rpartition(":")
    if module.endswith(".py"):
        return f"{Path(module).resolve()}:{function}"
    return name


# ---------------------------------------------------------------- users' models

def _user_entry(name: str) -> ModelEntry:
    module_name, _, function_name = name.rpartition(":")
    if not module_name or not function_name.isidentifier():
        raise UserError(f"--model {name!r}: expected package.module:function or path/to/file.py:function")
    module = _import_user_module(name, module_name)
    builder = getattr(module, function_name, None)
    if not callable(builder):
        raise UserError(f"--model {name}: module {module_name!r} has no function {function_name!r}")
    return ModelEntry(name, builder, PLAIN_RECIPE, "your model", {}, user_supplied=True)


def _import_user_module(name: str, module_name: str):
    where = socket.gethostname()
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            if not path.is_file():
                raise UserError(f"--model {name}: no file {path} on {where}")
            spec = importlib.util.spec_from_file_location(f"distvision_user_model_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses and pickling look a module up by its name
            spec.loader.exec_module(module)
            return module
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # the console script's path lacks the working folder
        return importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - a user's module can raise anything while importing
        raise UserError(f"--model {name}: cannot import {module_name!r} on {where}: "
                        f"{type(error).__name__}: {error}") from None


def _checked_user_model(entry: ModelEntry, num_classes: int, image_size: int, **kwargs) -> nn.Module:
    """Call a user's builder with the arguments it takes; check it gives a module of the right output."""
    accepted = inspect.signature(entry.builder).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    offered = {"num_classes": num_classes, "image_size": image_size, **kwargs}
    arguments = {k: v for k, v in offered.items() if takes_any or k in accepted}
    if "num_classes" not in arguments:
        raise UserError(f"--model {entry.name}: the function must take num_classes= (the number of classes)")
    try:
        model = entry.builder(**arguments)
    except Exception as error:  # noqa: BLE001 - the user's code
        raise UserError(f"--model {entry.name}: building the model failed: {type(error).__name__}: {error}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {entry.name}: the function returned {type(model).__name__}, not a torch.nn.Module")
    was_training = model.training
    try:
        with torch.no_grad():
            output = model.eval()(torch.zeros(2, 3, image_size, image_size))
    except Exception as error:  # noqa: BLE001 - the user's code
        raise UserError(f"--model {entry.name}: the model fails on a 2 x 3 x {image_size} x {image_size} batch: "
                        f"{type(error).__name__}: {error}") from None
    model.train(was_training)
    shape = tuple(getattr(output, "shape", ()))
    if shape != (2, num_classes):
        raise UserError(f"--model {entry.name}: the model maps 2 images to an output of shape {shape}, "
                        f"not (2, {num_classes}) logits")
    return model


_entry_points_loaded = False


def _load_entry_points() -> None:
    """Register the models installed packages announce under the `distvision.models` group: an entry
    point names a builder (trained with the plain recipe) or a module that calls register_model itself."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if point.name in _REGISTRY:
            continue
        try:
            loaded = point.load()
        except Exception as error:  # noqa: BLE001 - a broken plugin must not break every command
            print(f"distvision: warning: model {point.name!r} from {point.value} not loaded: {error}",
                  file=sys.stderr)
            continue
        if point.name not in _REGISTRY and callable(loaded):
            _REGISTRY[point.name] = ModelEntry(point.name, loaded, PLAIN_RECIPE, f"from {point.value}", {},
                                                   user_supplied=True)


def recipe_for(name: str, recipe_name: str | None = None) -> Recipe:
    """The model's default recipe, one of its named alternatives, or a TOML file of recipe fields laid
    over the default (`--recipe my-recipe.toml`)."""
    entry = get_entry(name)
    if recipe_name in (None, "default"):
        return entry.recipe
    if recipe_name.endswith(".toml"):
        return read_recipe_file(Path(recipe_name), entry.recipe)
    if recipe_name not in entry.alternatives:
        known = ", ".join(["default", *entry.alternatives])
        raise UserError(f"model {name!r} has no recipe {recipe_name!r}; it has: {known}")
    return entry.alternatives[recipe_name]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mflops_per_image(model: nn.Module, image_size: int, in_channels: int = 3, input_shape=None) -> float:
    """Forward multiply-adds x2 per image, in millions, counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = input_shape or (1, in_channels, image_size, image_size)
    model = model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(shape))
    return counter.get_total_flops() / 1e6

