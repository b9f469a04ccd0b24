"""The record recipes' tricks, each a small named piece (after airbench94 and Page's ResNet-9).

- patch-whitening initialisation of the first convolution, from training images;
- frozen batch-norm scales (only the shifts learn, at a higher learning rate: see train.make_optimizer);
- lookahead / EMA of the weights every few steps, pulled in harder as training ends.

Alternating flips live in data/augment.py and test-time augmentation in inference.py, beside the
code they change. Every trick is a recipe field, so each can be switched off and is recorded.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from distvision.errors import UserError

WHITENING_IMAGES = 5000  # airbench estimates the patch covariance from this many training images
WHITENING_EPS = 5e-4


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The model's first convolution: the layer whitening initialises."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module
    raise UserError("whitening needs a model that starts with a convolution; switch it off with --no-whiten")


def image_patches(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Every (channels, h, w) patch of NCHW images, flattened: (patches, channels*h*w)."""
    height, width = size
    patches = images.unfold(2, height, 1).unfold(3, width, 1)  # N, C, H', W', h, w
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * height * width).double()


def whitening_filters(patches: torch.Tensor, eps: float = WHITENING_EPS) -> torch.Tensor:
    """Filters that map patches onto their principal axes scaled to unit variance, and their negatives.

    With d = the patch dimension this gives 2d filters (d, then the same d negated, so a following
    GELU sees both signs of every component), strongest component first.
    """
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    filters = (eigenvectors / torch.sqrt(eigenvalues + eps)).T  # row i projects onto axis i
    return torch.cat([filters, -filters]).float()


def init_whitening(model: nn.Module, images: torch.Tensor, rank: int) -> None:
    """Set the first conv to whitening filters from preprocessed NCHW training images, and freeze it.

    Rank 0 computes them and broadcasts, so every worker holds bit-identical weights whatever its
    floating-point path. The conv's bias stays trainable.
    """
    conv = first_conv(model)
    channels, height, width = conv.weight.shape[1:]
    if conv.out_channels != 2 * channels * height * width:
        raise UserError(f"whitening fills 2 x {channels * height * width} filters, the first conv has "
                        f"{conv.out_channels}; switch it off with --no-whiten")
    weight = torch.zeros_like(conv.weight, memory_format=torch.contiguous_format)
    if rank == 0:
        filters = whitening_filters(image_patches(images.float().contiguous(), (height, width)))
        weight.copy_(filters.view_as(weight))
    if dist.is_initialized():
        dist.broadcast(weight, src=0)
    with torch.no_grad():
        conv.weight.copy_(weight)
    conv.weight.requires_grad_(False)


def freeze_norm_scales(model: nn.Module) -> None:
    """Fix every batch-norm scale at 1: the layer then only normalises and shifts."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            with torch.no_grad():
                module.weight.fill_(1.0)
            module.weight.requires_grad_(False)


def whitening_sample(train_indices: np.ndarray) -> np.ndarray:
    """The training images the whitening is estimated from: the first few, in index order."""
    return np.sort(train_indices)[:WHITENING_IMAGES]


class Lookahead:
    """An exponential moving average of the weights that the weights are pulled back to.

    Every `every` steps: ema <- decay * ema + (1 - decay) * weights, then weights <- ema. The decay
    grows as progress**3 (airbench94's schedule), so early training is untouched and the end is
    smoothed. `finish` makes the weights the average itself. Floating-point buffers (batch-norm
    running statistics) are averaged too; counters are not.
    """

    def __init__(self, model: nn.Module, every: int):
        self.every = every
        self.average = {name: value.detach().clone() for name, value in model.state_dict().items()}

    def decay(self, progress: float) -> float:
        return 0.95 ** self.every * progress ** 3

    @torch.no_grad()
    def maybe_update(self, model: nn.Module, step: int, progress: float) -> None:
        """Call after optimizer step number `step` (counted from 1)."""
        if step % self.every == 0:
            self._pull(model, self.decay(progress))

    @torch.no_grad()
    def catch_up(self, model: nn.Module, after_step: int, to_step: int, progress: float) -> bool:
        """Once, at a round's end, every pull the steps (after_step, to_step] crossed: a replica that
        synchronises every K steps pulls only where the weights agree. One pull with the decay raised to
        the number crossed keeps the average's memory in steps what the recipe's is (a decay of 0.77
        applied once per 24 steps would remember five times as long); a round of one step is exactly
        `maybe_update`. Returns whether it pulled."""
        pulls = to_step // self.every - after_step // self.every
        if pulls > 0:
            self._pull(model, self.decay(progress) ** pulls)
        return pulls > 0

    @torch.no_grad()
    def finish(self, model: nn.Module) -> None:
        """Make the weights the average. Under local SGD each replica kept its own average: they
        are averaged across workers first, so every worker ends with the same model."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            floats = [value for value in self.average.values() if value.is_floating_point()]
            flat = torch.cat([value.flatten() for value in floats])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for value, averaged in zip(floats, flat.split([v.numel() for v in floats]), strict=True):
                value.copy_(averaged.view_as(value))
        self._pull(model, 1.0)

    def _pull(self, model: nn.Module, decay: float) -> None:
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                average = self.average[name]
                average.lerp_(value, 1 - decay)
                value.copy_(average)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to store in a training checkpoint."""
        return {f"lookahead.{name}": value for name, value in self.average.items()}

    def load(self, tensors: dict[str, torch.Tensor], model: nn.Module) -> None:
        """Restore from a checkpoint's tensors; one saved without them restarts the average at the weights."""
        for name, value in model.state_dict().items():
            self.average[name].copy_(tensors.get(f"lookahead.{name}", value))
