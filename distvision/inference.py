"""The one inference path: a checkpoint becomes a model plus its preprocessing, and uint8 images
become logits with the precision (autocast, on a GPU as on a CPU) and the test-time augmentation
the checkpoint records.

`distvision evaluate`, the evaluation inside training and `distvision classify` all go through
`forward_logits`, so the three can never disagree about how a prediction is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distvision.data.batches import Preprocessing
from distvision.precision import autocast


def forward_logits(model: nn.Module, x: torch.Tensor, precision: str, device: torch.device,
                   test_time_flip: bool = False, test_time_shift: bool = False) -> torch.Tensor:
    """float32 logits of a preprocessed batch, with the test-time augmentation asked for.

    test_time_flip averages with the mirrored batch; test_time_shift then averages (half weight)
    with the batch moved one pixel up-left and one down-right with reflect padding, each mirrored
    too when flipping: airbench94's 6-view test-time augmentation.
    """

    def views_of(batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch).float()
        if test_time_flip:
            logits = (logits + model(batch.flip(3)).float()) / 2
        return logits

    with autocast(precision, device):
        logits = views_of(x)
        if test_time_shift:
            height, width = x.shape[2:]
            padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
            shifted = (views_of(padded[:, :, :height, :width]) + views_of(padded[:, :, 2:, 2:])) / 2
            logits = (logits + shifted) / 2
    return logits


@dataclass
class InferenceModel:
    """A trained model ready to predict, with everything its checkpoint says about how."""

    model: nn.Module
    preprocess: Preprocessing
    classes: list[str]
    image_size: int
    precision: str
    test_time_flip: bool
    test_time_shift: bool
    device: torch.device
    info: dict  # the checkpoint's checkpoint.json

    @torch.inference_mode()
    def logits(self, images: np.ndarray) -> torch.Tensor:
        """Logits of (N, H, W, 3) uint8 RGB images at the checkpoint's image size."""
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        return forward_logits(self.model, self.preprocess(batch), self.precision, self.device,
                              self.test_time_flip, self.test_time_shift)


def load_inference_model(checkpoint: Path, device: torch.device | None = None) -> InferenceModel:
    """Load a checkpoint (run folder or its checkpoint/ folder) into an eval-mode, channels_last model.

    Without a device: the GPU when there is one, else the CPU, the device type training evaluated on
    where possible, so accuracies match exactly.
    """
    from distvision.checkpoint import load_checkpoint
    from distvision.models import create

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    weights, info = load_checkpoint(checkpoint)
    # The preprocessing tensors travel in the checkpoint, so the data set's statistics cannot drift.
    preprocess = Preprocessing(info["preprocessing"], weights.pop("preprocess.mean"), weights.pop("preprocess.scale"))
    model = create(info["model"], num_classes=len(info["classes"]), image_size=info["image_size"])
    model.load_state_dict(weights)
    model = model.to(device, memory_format=torch.channels_last).eval()
    return InferenceModel(
        model=model, preprocess=preprocess.to(device), classes=list(info["classes"]),
        image_size=int(info["image_size"]), precision=info["precision"],
        test_time_flip=bool(info["test_time_flip"]), test_time_shift=bool(info.get("test_time_shift", False)),
        device=device, info=info,
    )
