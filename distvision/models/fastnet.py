"""fastnet: airbench94's network and recipe (Keller Jordan's CIFAR-10 speedrun).

A 2x2 stem conv (24 channels, patch-whitening filters), three groups conv-maxpool-BN-GELU-conv-BN-GELU
of widths 64/256/256, a final max-pool, and a bias-free linear head scaled by 1/9. The default
recipe is airbench94's: every trick in it can be switched off (`--no-whiten`, `--no-ema`, ...).
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
        self.norm1 = nn.BatchNorm2d(out_channels, momentum=0.4, eps=1e-12)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels, momentum=0.4, eps=1e-12)
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
    # airbench94's hyperparameters in this loop's terms: its lr 11.5 and decay 0.0153 per 1024
    # samples of a summed loss, divided by 1024 * (1 + 1/(1 - momentum)), give lr 1.5 on the mean
    # loss of a 1024 batch and a decay of 0.002 per step; warmup from 0.2 over 23% then down to 0.07.
    recipe=Recipe(epochs=10, batch_size=1024, lr=1.5, momentum=0.85, nesterov=True, weight_decay=0.002,
                  decoupled_weight_decay=True, schedule=((0.0, 0.2), (0.23, 1.0), (1.0, 0.07)),
                  bias_lr_mult=64.0, bias_decay=True, label_smoothing=0.2, translate=2, flip=True,
                  alternating_flip=True, whiten=True, frozen_norm_scale=True, ema_every=5,
                  test_time_flip=True, test_time_shift=True),
    description="airbench94's net and recipe: whitened 2x2 stem, conv groups 64/256/256, 2M parameters",
)
def fastnet(num_classes: int = 10, image_size: int = 32, widths: tuple[int, int, int] = (64, 256, 256)) -> nn.Module:
    stem = nn.Conv2d(3, 24, 2, bias=True)
    stem.bias.lr_mult = 1.0  # not a norm shift: the recipe's bias_lr_mult is not for it
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
