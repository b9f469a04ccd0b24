"""Model registry: `distvision.models.create(name, num_classes=10, image_size=32)`."""

from distvision.models.registry import create, get_entry, list_models, recipe_for, register_model

__all__ = ["create", "get_entry", "list_models", "recipe_for", "register_model"]
