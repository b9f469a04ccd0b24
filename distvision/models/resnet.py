"""ResNet-18, CIFAR variant: 3x3 stem without max-pool, four stages of two basic blocks."""

from __future__ import annotations

import torch
from torch import nn

from distvision.models.registry import register_model
from distvision.recipes import Recipe, one_cycle


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@register_model(
    "resnet18",
    recipe=Recipe(epochs=30, batch_size=256, lr=0.2, weight_decay=5e-4, schedule=one_cycle(0.15),
                  label_smoothing=0.1, translate=4, flip=True, bias_decay=False),
    description="ResNet-18 for CIFAR (3x3 stem, no max-pool), 11M parameters",
)
def resnet18(num_classes: int = 10, image_size: int = 32) -> nn.Module:
    layers, in_channels = [], 64
    for out_channels, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels, 1)]
        in_channels = out_channels
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        *layers,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes),
    )
