"""Batched augmentation: one gather does translate (padded crop) and horizontal flip for a batch.

The randomness of a sample is a hash of (seed, epoch, sample index), never of the rank, so the
same sample gets the same augmentation whichever worker trains it: a run's result does not
depend on the worker count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
RUN_WIDE = -1  # the "epoch" key of random decisions that hold for the whole run


@dataclass(frozen=True)
class AugmentSettings:
    """translate: max shift in pixels (reflect padding); flip: random mirror; cutout: square size, 0 off.

    alternating_flip (airbench94): each image gets one random mirror decision for the run, and
    every odd epoch the whole set is mirrored, so an image alternates between its two views
    instead of repeating one by chance.
    """

    translate: int = 0
    flip: bool = False
    cutout: int = 0
    alternating_flip: bool = False

    @property
    def active(self) -> bool:
        return self.translate > 0 or self.flip or self.cutout > 0


def _splitmix64(values: np.ndarray) -> np.ndarray:
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, indices: np.ndarray, streams: int) -> np.ndarray:
    """(len(indices), streams) uniforms in [0, 1), a pure function of (seed, epoch, index, stream)."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed & 0xFFFFFFFF) << np.uint64(32) | np.uint64(epoch & 0xFFFFFFFF))
        base = indices.astype(np.uint64)[:, None] * np.uint64(streams) + np.arange(streams, dtype=np.uint64)
        bits = _splitmix64(_splitmix64(base ^ key) & _MASK64)
    return (bits >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def augment_batch(
    images: torch.Tensor, indices: np.ndarray, settings: AugmentSettings, seed: int, epoch: int
) -> torch.Tensor:
    """Augment uint8 NHWC images of the given sample indices; returns uint8 NHWC."""
    if not settings.active:
        return images
    count, height, width, _ = images.shape
    device = images.device  # on a GPU the gather runs there; the uniforms are tiny
    u = torch.from_numpy(sample_uniforms(seed, epoch, indices, 5)).to(device)
    pad = settings.translate
    rows = torch.arange(height, device=device).expand(count, height)
    cols = torch.arange(width, device=device).expand(count, width)
    if settings.flip:
        if settings.alternating_flip:
            once = torch.from_numpy(sample_uniforms(seed, RUN_WIDE, indices, 1)[:, 0]).to(device) < 0.5
            flip = once ^ bool(epoch % 2)
        else:
            flip = u[:, 0] < 0.5
        cols = torch.where(flip[:, None], width - 1 - cols, cols)
    if pad:
        # Reflect padding, then a crop at a random offset: the same as a translate with reflection.
        dy = (u[:, 1] * (2 * pad + 1)).long()
        dx = (u[:, 2] * (2 * pad + 1)).long()
        nchw = images.permute(0, 3, 1, 2)
        padded = torch.nn.functional.pad(nchw.float() if nchw.dtype == torch.uint8 else nchw,
                                         (pad, pad, pad, pad), mode="reflect")
        images = padded.to(images.dtype).permute(0, 2, 3, 1)
        rows = rows + dy[:, None]
        cols = cols + dx[:, None]
    batch = torch.arange(count, device=device)[:, None, None]
    out = images[batch, rows[:, :, None], cols[:, None, :]]
    if settings.cutout:
        size = settings.cutout
        cy = (u[:, 3] * height).long()[:, None, None]
        cx = (u[:, 4] * width).long()[:, None, None]
        ys = torch.arange(height, device=device)[None, :, None]
        xs = torch.arange(width, device=device)[None, None, :]
        inside = ((ys - cy).abs() <= size // 2) & ((xs - cx).abs() <= size // 2)
        out = out.masked_fill(inside[..., None], 0)
    return out.contiguous()
