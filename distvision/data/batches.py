"""Turn uint8 NHWC samples into model input: gather, augment, normalise, channels_last."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

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


# uint8 NHWC images: a memory-mapped array, or one tensor resident on the training device.
Images = np.ndarray | torch.Tensor


def resident(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """The whole uint8 array on the device, copied once (CIFAR-10's training set is 150 MB): batches
    are then gathered and augmented there, and nothing crosses the host-device link per step."""
    return torch.from_numpy(np.array(images, copy=True)).to(device)  # a copy: off the memory map, writable


def gather(images: Images, indices: np.ndarray, device: torch.device) -> torch.Tensor:
    """The uint8 samples of these indices, in this order, on the device."""
    if isinstance(images, torch.Tensor):
        return images.index_select(0, torch.from_numpy(indices).to(images.device)).to(device)
    # Sorted reads are kinder to a memory-mapped file; the order is undone right after.
    order = np.argsort(indices, kind="stable")
    gathered = np.empty((len(indices),) + images.shape[1:], dtype=np.uint8)
    gathered[order] = images[indices[order]]
    # uint8 travels to the device (4x fewer bytes than float) and is augmented there.
    return torch.from_numpy(gathered).to(device, non_blocking=True)


def load_batch(
    images: Images,
    indices: np.ndarray,
    preprocess: Preprocessing,
    device: torch.device,
    augment: AugmentSettings | None = None,
    seed: int = 0,
    epoch: int = 0,
) -> torch.Tensor:
    """Model input for the given sample indices (augmented when settings are given)."""
    batch = gather(images, indices, device)
    if augment is not None and augment.active:
        batch = augment_batch(batch, indices, augment, seed, epoch)
    return preprocess(batch)


class BatchPrefetcher:
    """Loads the next training batch while this step's gradients are exchanged.

    A CPU worker usually owns one core, and in an all-reduce it mostly waits: for the transfer and
    for the slowest worker. The exchange runs in gloo's own thread, so the training thread can load
    the next batch meanwhile (Synchronizer calls load_ahead from its communication hook) instead
    of after the step. A loading thread of our own gained less in paired-epoch measurements
    (benchmarks/RESULTS.md): it competed with the step for the core and the GIL.
    The batch is the same pure function of (indices, epoch) as load_batch; a batch loaded ahead
    whose indices turn out not to be the ones needed (the balancer re-split the batch meanwhile) is
    dropped and the batch loaded when it is taken.
    """

    def __init__(self, images: Images, preprocess: Preprocessing, device: torch.device,
                 augment: AugmentSettings, seed: int):
        self._load = partial(load_batch, images, preprocess=preprocess, device=device, augment=augment, seed=seed)
        self._wanted: tuple[np.ndarray, int] | None = None  # the batch to load ahead, not yet loaded
        self._ahead: tuple[np.ndarray, int, torch.Tensor] | None = None
        self.seconds = 0.0  # spent loading, ahead or not

    def prefetch(self, indices: np.ndarray, epoch: int) -> None:
        """Ask for a batch to be loaded at the next load_ahead, for a later take()."""
        self._wanted = (indices, epoch)

    def load_ahead(self) -> None:
        """Load the batch asked for, if any (called while an exchange is in flight)."""
        if self._wanted is not None:
            (indices, epoch), self._wanted = self._wanted, None
            self._ahead = (indices, epoch, self._timed_load(indices, epoch))

    def take(self, indices: np.ndarray, epoch: int) -> torch.Tensor:
        """The batch of these indices: the one loaded ahead when it matches, else loaded now."""
        ahead, self._ahead, self._wanted = self._ahead, None, None
        if ahead is not None and ahead[1] == epoch and np.array_equal(ahead[0], indices):
            return ahead[2]
        return self._timed_load(indices, epoch)

    def _timed_load(self, indices: np.ndarray, epoch: int) -> torch.Tensor:
        started = time.perf_counter()
        batch = self._load(indices, epoch=epoch)
        self.seconds += time.perf_counter() - started
        return batch
