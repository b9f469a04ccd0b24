"""A plain multi-layer perceptron, for small vector problems (8-bit parity, digits)."""

from __future__ import annotations

from torch import nn

from distvision.models.registry import register_model
from distvision.recipes import Recipe, one_cycle


@register_model(
    "mlp",
    recipe=Recipe(epochs=20, batch_size=128, lr=0.05, weight_decay=0.0, schedule=one_cycle(0.1)),
    description="MLP: flatten, hidden layers with ReLU, linear head",
)
def mlp(num_classes: int = 10, image_size: int = 32, in_features: int | None = None,
        hidden: tuple[int, ...] = (256, 256), in_channels: int = 3) -> nn.Module:
    """in_features defaults to an image's in_channels * image_size^2."""
    width = in_features or in_channels * image_size * image_size
    layers: list[nn.Module] = [nn.Flatten()]
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
