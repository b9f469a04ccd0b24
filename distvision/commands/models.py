"""`distvision models`: the registered models, their size and their recipes."""

from __future__ import annotations

import argparse
import json

from distvision.models.registry import count_parameters, list_models, mflops_per_image


def run(args: argparse.Namespace, argv: list[str]) -> None:
    """Print one line per model and one per recipe."""
    print(f"{'name':<12} {'params':>10} {'MFLOPs/img':>10}  description")
    for entry in list_models():
        model = entry.builder(num_classes=10, image_size=32)
        print(f"{entry.name:<12} {count_parameters(model):>10,} {mflops_per_image(model, 32):>10.1f}  "
              f"{entry.description}")
        recipes = {"default": entry.recipe, **entry.alternatives}
        for name, recipe in recipes.items():
            print(f"{'':<12} recipe {name}: {json.dumps(recipe.to_dict())}")
