"""Model registry: `distvision.models.create(name, num_classes=10, image_size=32)`.

Each family's module registers its models with @register_model when imported, as timm's do; the
package imports them all here, so the registry itself imports none of them (no cycle).
"""

from distvision.models import caffe, fastnet, mlp, resnet  # noqa: F401  (registration)
from distvision.models.registry import create, get_entry, list_models, recipe_for, register_model

__all__ = ["create", "get_entry", "list_models", "recipe_for", "register_model"]
