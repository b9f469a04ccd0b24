"""Evaluation: exact global accuracy over a split, shared across ranks; `distvision evaluate`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from distvision.data.batches import Images, Preprocessing, load_batch
from distvision.errors import UserError
from distvision.inference import forward_logits, load_inference_model

# Fixed chunks of the evaluation set: the same chunks in training and in `evaluate`, so both
# compute identical numbers whatever the worker count.
EVAL_CHUNK = 500


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    correct: int
    count: int


@torch.inference_mode()
def evaluate_split(
    model: nn.Module,
    images: Images,
    labels: np.ndarray,
    preprocess: Preprocessing,
    precision: str,
    device: torch.device,
    test_time_flip: bool = False,
    test_time_shift: bool = False,
    indices: np.ndarray | None = None,
) -> EvalResult:
    """Loss and accuracy over images (or the given indices of it); each rank takes every world_size-th chunk."""
    indices = np.arange(len(images)) if indices is None else indices
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    for start in range(rank * EVAL_CHUNK, len(indices), world_size * EVAL_CHUNK):
        chunk = indices[start : start + EVAL_CHUNK]
        x = load_batch(images, chunk, preprocess, device)
        y = torch.from_numpy(labels[chunk]).to(device)
        logits = forward_logits(model, x, precision, device, test_time_flip, test_time_shift)
        totals[0] += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        totals[1] += (logits.argmax(1) == y).sum().item()
        totals[2] += len(chunk)
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    loss_sum, correct, count = totals.tolist()
    return EvalResult(loss_sum / max(count, 1), correct / max(count, 1), int(correct), int(count))


def evaluate_checkpoint(checkpoint: Path, data: Path, cache_dir: Path | None = None) -> dict:
    """Evaluate a saved checkpoint on the test split of data, with the settings it was saved with."""
    from distvision.data.prepare import ensure_prepared, open_prepared

    loaded = load_inference_model(checkpoint)
    prepared = open_prepared(ensure_prepared(data, loaded.image_size, cache_dir))
    if prepared.classes != loaded.classes:
        raise UserError(f"{data} has classes {prepared.classes}, the checkpoint was trained on {loaded.classes}")
    result = evaluate_split(
        loaded.model, prepared.test_images, prepared.test_labels, loaded.preprocess, loaded.precision,
        loaded.device, loaded.test_time_flip, loaded.test_time_shift,
    )
    return {"test_accuracy": result.accuracy, "test_loss": result.loss, "test_count": result.count}
