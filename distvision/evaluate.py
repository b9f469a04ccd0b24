"""Evaluation: exact accuracy over a split, in parts that workers share; `distvision evaluate`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
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


def evaluate_part(
    model: nn.Module,
    images: Images,
    labels: np.ndarray,
    preprocess: Preprocessing,
    precision: str,
    device: torch.device,
    test_time_flip: bool = False,
    test_time_shift: bool = False,
    indices: np.ndarray | None = None,
    part: int = 0,
    parts: int = 1,
) -> torch.Tensor:
    """Part `part` of `parts` of an evaluation over images (or the given indices of it): every parts-th
    chunk from the part-th; returns its loss sum, correct count and count (float64), to be summed over
    the parts (result_of). A chunk gives the same numbers whoever evaluates it, so the sum does not
    depend on the number of parts; the defaults evaluate the whole split."""
    indices = np.arange(len(images)) if indices is None else indices
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with torch.inference_mode():
        for start in range(part * EVAL_CHUNK, len(indices), parts * EVAL_CHUNK):
            chunk = indices[start : start + EVAL_CHUNK]
            x = load_batch(images, chunk, preprocess, device)
            y = torch.from_numpy(labels[chunk]).to(device)
            logits = forward_logits(model, x, precision, device, test_time_flip, test_time_shift)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum().item())
            count += len(chunk)
    model.train(was_training)
    # A plain tensor (made outside inference mode), so that a collective can sum it in place.
    return torch.tensor([loss_sum, correct, count], dtype=torch.float64)


def result_of(totals: torch.Tensor) -> EvalResult:
    """The loss and accuracy of summed evaluate_part totals."""
    loss_sum, correct, count = totals.tolist()
    return EvalResult(loss_sum / max(count, 1), correct / max(count, 1), int(correct), int(count))


def evaluate_checkpoint(checkpoint: Path, data: Path, cache_dir: Path | None = None) -> dict:
    """Evaluate a saved checkpoint on the test split of data, with the settings it was saved with."""
    from distvision.data.prepare import ensure_prepared, open_prepared

    loaded = load_inference_model(checkpoint)
    prepared = open_prepared(ensure_prepared(data, loaded.image_size, cache_dir))
    if prepared.classes != loaded.classes:
        raise UserError(f"{data} has classes {prepared.classes}, the checkpoint was trained on {loaded.classes}")
    result = result_of(evaluate_part(
        loaded.model, prepared.test_images, prepared.test_labels, loaded.preprocess, loaded.precision,
        loaded.device, loaded.test_time_flip, loaded.test_time_shift,
    ))
    return {"test_accuracy": result.accuracy, "test_loss": result.loss, "test_count": result.count}
