"""`distvision models`: the registered models, their size and their recipes, as a table or as JSON lines."""

from __future__ import annotations

import argparse
import json

from distvision.models.registry import ModelEntry, count_parameters, create, list_models, mflops_per_image

IMAGE_SIZE = 32  # the size the parameters and MFLOPs are counted at (CIFAR-10's)


def run(args: argparse.Namespace, argv: list[str]) -> None:
    """Print a table, one row per model; with --json, one JSON object per model with every recipe field."""
    rows = [model_row(entry) for entry in list_models()]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(format_table(rows))
    print(f"\nCounted at image size {IMAGE_SIZE} with 10 classes. Every recipe field: distvision models --json; "
          "another recipe: distvision train --recipe NAME")


def model_row(entry: ModelEntry) -> dict:
    """One model's name, size, cost per image, description and recipes (every field)."""
    model = create(entry.name, num_classes=10, image_size=IMAGE_SIZE)
    recipes = {"default": entry.recipe, **entry.alternatives}
    return {"name": entry.name, "parameters": count_parameters(model),
            "mflops_per_image": round(mflops_per_image(model, IMAGE_SIZE), 1), "description": entry.description,
            "recipes": {name: recipe.to_dict() for name, recipe in recipes.items()}}


def format_table(rows: list[dict]) -> str:
    """Aligned columns: name, parameters, MFLOPs/image, the default recipe's epochs, batch and lr, the
    recipes, the description."""
    header = ("model", "parameters", "MFLOPs/image", "epochs", "batch", "lr", "recipes", "description")
    cells = [header]
    for row in rows:
        default = row["recipes"]["default"]
        cells.append((row["name"], f"{row['parameters']:,}", f"{row['mflops_per_image']:.1f}", str(default["epochs"]),
                      str(default["batch_size"]), f"{default['lr']:g}", ",".join(row["recipes"]),
                      row["description"]))
    widths = [max(len(line[column]) for line in cells) for column in range(len(header))]
    left = {0, 6, 7}  # text columns; numbers align right
    return "\n".join("  ".join(cell.ljust(width) if column in left else cell.rjust(width)
                               for column, (cell, width) in enumerate(zip(line, widths, strict=True))).rstrip()
                     for line in cells)
