"""fastnet: the shape of airbench94's network (Keller Jordan's CIFAR-10 speedrun).

A 2x2 stem conv (24 channels), three groups conv-maxpool-BN-GELU-conv-BN-GELU of widths
64/256/256, a final max-pool, and a bias-free linear head scaled by 1/9.
"""

from __future__ import annotations

import torch
from torch import nn

from distvision.models.registry import register_model
from distvision.recipes import Recipe


class ConvGroup(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(out_channels, momentum=0.4)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels, momentum=0.4)
        for conv in (self.conv1, self.conv2):  # airbench's partial dirac init keeps early signal
            nn.init.dirac_(conv.weight[: conv.in_channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.norm1(self.pool(self.conv1(x))))
        return nn.functional.gelu(self.norm2(self.conv2(x)))


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


@register_model(
    "fastnet",
    recipe=Recipe(epochs=10, batch_size=512, lr=0.2, momentum=0.85, nesterov=True, weight_decay=5e-4,
                  schedule=((0.0, 0.1), (0.2, 1.0), (1.0, 0.0)), bias_lr_mult=1.0, bias_decay=False,
                  label_smoothing=0.2, translate=2, flip=True, test_time_flip=True),
    description="airbench94-shaped net: 2x2 stem, conv groups 64/256/256, 2M parameters",
)
def fastnet(num_classes: int = 10, image_size: int = 32, widths: tuple[int, int, int] = (64, 256, 256)) -> nn.Module:
    stem = nn.Conv2d(3, 24, 2, bias=True)
    # After the 2x2 stem the side is image_size-1; three 2x max-pools then the final pool to 1x1.
    side = image_size - 1
    for _ in range(3):
        side //= 2
    return nn.Sequential(
        stem, nn.GELU(),
        ConvGroup(24, widths[0]), ConvGroup(widths[0], widths[1]), ConvGroup(widths[1], widths[2]),
        nn.MaxPool2d(max(side, 1)), nn.Flatten(),
        nn.Linear(widths[2], num_classes, bias=False), Scale(1 / 9),
    )
