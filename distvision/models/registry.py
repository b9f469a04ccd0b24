"""The model registry: `@register_model(recipe)` on a builder, `create(name, ...)` to build one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from distvision.errors import UserError
from distvision.recipes import Recipe


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    recipe: Recipe
    description: str
    # Extra named recipes, e.g. "caffe" for Caffe's exact solver.
    alternatives: dict[str, Recipe]


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, recipe: Recipe, description: str, alternatives: dict[str, Recipe] | None = None):
    """Decorator: register builder(num_classes, image_size, **kwargs) -> nn.Module under name."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelEntry(name, builder, recipe, description, alternatives or {})
        return builder

    return wrap


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_models() -> list[ModelEntry]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def create(name: str, num_classes: int = 10, image_size: int = 32, **kwargs) -> nn.Module:
    """Build a registered model; layers that depend on the input size follow image_size."""
    return get_entry(name).builder(num_classes=num_classes, image_size=image_size, **kwargs)


def recipe_for(name: str, recipe_name: str | None = None) -> Recipe:
    """The model's default recipe, or one of its named alternatives."""
    entry = get_entry(name)
    if recipe_name in (None, "default"):
        return entry.recipe
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

