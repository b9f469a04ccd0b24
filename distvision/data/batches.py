"""Turn uint8 NHWC samples into model input: gather, augment, normalise, channels_last."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distvision.data.augment import AugmentSettings, augment_batch


@dataclass
class Preprocessing:
    """How pixels become inputs. kind "standardize": (x/255 - mean)/std; "caffe": x - mean image (0-255)."""

    kind: str
    mean: torch.Tensor  # (1, 3, 1, 1) for standardize, (1, 3, H, W) for caffe; in input units
    scale: torch.Tensor  # (1, 3, 1, 1): multiply after subtracting

    @classmethod
    def build(cls, kind: str, channel_mean: list[float], channel_std: list[float], mean_image: np.ndarray):
        if kind == "standardize":
            mean = torch.tensor(channel_mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
            scale = 1 / (torch.tensor(channel_std, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        elif kind == "caffe":
            mean = torch.from_numpy(np.asarray(mean_image, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
            scale = torch.ones(1, 3, 1, 1)
        else:
            raise ValueError(f"unknown preprocessing {kind!r}")
        return cls(kind, mean.contiguous(), scale)

    def to(self, device: torch.device) -> Preprocessing:
        return Preprocessing(self.kind, self.mean.to(device), self.scale.to(device))

    def __call__(self, images_nhwc: torch.Tensor) -> torch.Tensor:
        # NHWC memory permuted to NCHW is already channels_last: no copy until the float conversion.
        x = images_nhwc.permute(0, 3, 1, 2).float()
        return ((x - self.mean) * self.scale).contiguous(memory_format=torch.channels_last)


def load_batch(
    images: np.ndarray,
    indices: np.ndarray,
    preprocess: Preprocessing,
    device: torch.device,
    augment: AugmentSettings | None = None,
    seed: int = 0,
    epoch: int = 0,
) -> torch.Tensor:
    """Model input for the given sample indices (augmented when settings are given)."""
    # Sorted reads are kinder to a memory-mapped file; the order is undone right after.
    order = np.argsort(indices, kind="stable")
    gathered = np.empty((len(indices),) + images.shape[1:], dtype=np.uint8)
    gathered[order] = images[indices[order]]
    # uint8 travels to the device (4x fewer bytes than float) and is augmented there.
    batch = torch.from_numpy(gathered).to(device, non_blocking=True)
    if augment is not None and augment.active:
        batch = augment_batch(batch, indices, augment, seed, epoch)
    return preprocess(batch)
