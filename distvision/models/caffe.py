"""Caffe's CIFAR-10 example networks, layer for layer (BVLC/caffe examples/cifar10).

Caffe rounds pooled sizes up, so pooling uses ceil_mode; initialisation follows the
prototxt (zero-mean gaussians of the given std, zero biases).
"""

from __future__ import annotations

import torch
from torch import nn

from distvision.models.registry import register_model
from distvision.recipes import Recipe, step_down


def _pooled(size: int) -> int:
    return -(-(size - 3) // 2) + 1  # Caffe: ceil((size - kernel) / stride) + 1


def _init(layer: nn.Module, std: float) -> nn.Module:
    nn.init.normal_(layer.weight, 0.0, std)
    nn.init.zeros_(layer.bias)
    return layer


class WithinChannelLRN(nn.Module):
    """Caffe's LRN with norm_region WITHIN_CHANNEL: x / (1 + alpha * mean_{n x n}(x^2))^beta."""

    def __init__(self, size: int = 3, alpha: float = 5e-5, beta: float = 0.75):
        super().__init__()
        self.size, self.alpha, self.beta = size, alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Caffe pads with zeros and divides by size^2 (count_include_pad).
        mean_square = nn.functional.avg_pool2d(x * x, self.size, 1, self.size // 2, count_include_pad=True)
        return x * (1 + self.alpha * mean_square).pow(-self.beta)


def _caffe_trunk(lrn: bool) -> list[nn.Module]:
    norm = (lambda: [WithinChannelLRN()]) if lrn else (list)
    return [
        _init(nn.Conv2d(3, 32, 5, padding=2), 1e-4),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.ReLU(),
        *norm(),
        _init(nn.Conv2d(32, 32, 5, padding=2), 0.01),
        nn.ReLU(),
        nn.AvgPool2d(3, 2, ceil_mode=True),
        *norm(),
        _init(nn.Conv2d(32, 64, 5, padding=2), 0.01),
        nn.ReLU(),
        nn.AvgPool2d(3, 2, ceil_mode=True),
        nn.Flatten(),
    ]


# Caffe's solver, exactly: batch 100, lr 0.001 then x0.1 for the last part, momentum 0.9,
# weight decay 0.004, biases at 2x lr without decay, raw 0-255 pixels minus the mean image.
CAFFE_QUICK_SOLVER = Recipe(
    epochs=10, batch_size=100, lr=0.001, momentum=0.9, nesterov=False, weight_decay=0.004,
    schedule=step_down(0.8, 0.1), bias_lr_mult=2.0, bias_decay=False, preprocessing="caffe",
)
CAFFE_FULL_SOLVER = CAFFE_QUICK_SOLVER.with_overrides(
    epochs=140, schedule=((0.0, 1.0), (60 / 70, 1.0), (60 / 70, 0.1), (65 / 70, 0.1), (65 / 70, 0.01), (1.0, 0.01))
)


@register_model(
    "caffe-quick",
    # Caffe's net and preprocessing, with flips and a one-cycle schedule that peaks higher.
    recipe=CAFFE_QUICK_SOLVER.with_overrides(
        lr=0.003, nesterov=True, schedule=((0.0, 0.2), (0.15, 1.0), (1.0, 0.0)), flip=True,
    ),
    description="Caffe cifar10_quick: 3 conv 5x5 (32-32-64), fc 64, fc 10",
    alternatives={"caffe": CAFFE_QUICK_SOLVER},
)
def caffe_quick(num_classes: int = 10, image_size: int = 32) -> nn.Module:
    side = _pooled(_pooled(_pooled(image_size)))
    return nn.Sequential(
        *_caffe_trunk(lrn=False),
        _init(nn.Linear(64 * side * side, 64), 0.1),
        _init(nn.Linear(64, num_classes), 0.1),
    )


@register_model(
    "caffe-full",
    recipe=CAFFE_FULL_SOLVER.with_overrides(
        epochs=30, lr=0.003, nesterov=True, schedule=((0.0, 0.2), (0.15, 1.0), (1.0, 0.0)), flip=True,
    ),
    description="Caffe cifar10_full: 3 conv 5x5 with within-channel LRN, fc 10",
    alternatives={"caffe": CAFFE_FULL_SOLVER},
)
def caffe_full(num_classes: int = 10, image_size: int = 32) -> nn.Module:
    side = _pooled(_pooled(_pooled(image_size)))
    classifier = _init(nn.Linear(64 * side * side, num_classes), 0.01)
    classifier.weight.decay_mult = 250.0  # Caffe's decay_mult on ip1's weights
    return nn.Sequential(*_caffe_trunk(lrn=True), classifier)
