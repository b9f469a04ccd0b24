"""Merge the parts into the outputs: predictions.csv, errors.csv, summary.json and, for a labelled
input, accuracy with per-class precision/recall and a confusion matrix (CSV and PNG)."""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distvision.classify.inputs import UNLABELLED
from distvision.classify.settings import Outputs
from distvision.classify.work import Plan, finished_chunks, read_part
from distvision.errors import UserError
from distvision.extras import missing
from distvision.metrics import say

PREDICTION_COLUMNS = ["path", "predicted_class", "probability", "top_classes", "top_probabilities"]
LIST_SEPARATOR = ";"  # between the top-k classes (and probabilities) inside one CSV field


@dataclass
class Merged:
    rows: list[tuple[int, list[int], list[float]]]  # (item, top-k class indices, their probabilities), item order
    errors: list[tuple[int, str]]  # (item, reason), item order
    parts: list[dict]  # every part's bookkeeping (rank, attempt, times, counts), without its rows


def merge_parts(plan: Plan, outputs: Outputs) -> Merged:
    """Every chunk's part, in chunk order (which is row order)."""
    missing = sorted(set(range(plan.chunk_count)) - finished_chunks(outputs))
    if missing:
        raise UserError(f"{len(missing)} chunk(s) have no part in {outputs.parts} (first: {missing[0]}): "
                        "rerun the same command to finish them")
    rows, errors, parts = [], [], []
    for chunk in range(plan.chunk_count):
        part = read_part(outputs, chunk)
        rows += [tuple(row) for row in part.pop("rows")]
        errors += [tuple(error) for error in part.pop("errors")]
        parts.append(part)
    return Merged(rows, errors, parts)


@contextmanager
def _atomic_csv(path: Path):
    """A csv.writer on a temp file that replaces path only when complete."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        yield csv.writer(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_predictions(path: Path, plan: Plan, merged: Merged) -> None:
    classes = plan.settings["classes"]
    with _atomic_csv(path) as writer:
        writer.writerow(PREDICTION_COLUMNS)
        for item, top, probabilities in merged.rows:
            writer.writerow([
                plan.data.paths[item], classes[top[0]], f"{probabilities[0]:.6f}",
                LIST_SEPARATOR.join(classes[i] for i in top),
                LIST_SEPARATOR.join(f"{p:.6f}" for p in probabilities),
            ])


def write_errors(path: Path, plan: Plan, merged: Merged) -> None:
    with _atomic_csv(path) as writer:
        writer.writerow(["path", "reason"])
        writer.writerows([plan.data.paths[item], reason] for item, reason in merged.errors)


def accuracy_report(plan: Plan, merged: Merged, outputs: Outputs) -> dict | None:
    """Accuracy, per-class precision/recall and the confusion matrix of the labelled rows; None if none."""
    labels = plan.data.labels
    if labels is None:
        return None
    pairs = np.array([(labels[item], top[0]) for item, top, _ in merged.rows if labels[item] != UNLABELLED],
                     dtype=np.int64).reshape(-1, 2)
    if not len(pairs):
        return None
    classes = plan.settings["classes"]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)  # [true, predicted]
    np.add.at(confusion, (pairs[:, 0], pairs[:, 1]), 1)
    correct = int(np.trace(confusion))
    per_class = []
    for i, name in enumerate(classes):
        predicted, actual = int(confusion[:, i].sum()), int(confusion[i].sum())
        per_class.append({
            "class": name,
            "precision": confusion[i, i] / predicted if predicted else None,
            "recall": confusion[i, i] / actual if actual else None,
            "support": actual,
            "predicted": predicted,
        })
    with _atomic_csv(outputs.per_class) as writer:
        writer.writerow(["class", "precision", "recall", "support", "predicted"])
        for row in per_class:
            writer.writerow([row["class"], _format(row["precision"]), _format(row["recall"]), row["support"],
                             row["predicted"]])
    with _atomic_csv(outputs.confusion_csv) as writer:
        writer.writerow(["true\\predicted", *classes])
        writer.writerows([name, *confusion[i].tolist()] for i, name in enumerate(classes))
    plot_confusion(confusion, classes, correct / len(pairs), outputs.confusion_png)
    return {"accuracy": correct / len(pairs), "correct": correct, "labelled_images": len(pairs),
            "per_class": [{k: (float(v) if isinstance(v, np.floating) else v) for k, v in row.items()}
                          for row in per_class]}


def _format(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def plot_confusion(confusion: np.ndarray, classes: list[str], accuracy: float, path: Path) -> None:
    """The confusion matrix as a PNG, rows normalised to recall, counts written in the cells; skipped, with a
    note, without matplotlib (the CSV holds the same counts)."""
    if reason := missing("matplotlib", "plots"):
        say(f"distvision: no {path.name}: {reason}")
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size = max(4.0, 0.6 * len(classes) + 2)
    figure = Figure(figsize=(size + 1, size))
    FigureCanvasAgg(figure)  # the Agg backend, without pyplot's global state
    axes = figure.add_subplot()
    recall = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    image = axes.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, label="share of the true class")
    ticks = range(len(classes))
    axes.set_xticks(ticks, classes, rotation=45, ha="right")
    axes.set_yticks(ticks, classes)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"accuracy {accuracy:.4f} ({int(confusion.sum())} images)")
    if len(classes) <= 30:
        for (true, predicted), count in np.ndenumerate(confusion):
            axes.text(predicted, true, str(count), ha="center", va="center", fontsize=8,
                      color="white" if recall[true, predicted] > 0.5 else "black")
    figure.tight_layout()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    figure.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def throughput(parts: list[dict], launch: str) -> dict:
    """Images/s and seconds of this invocation's parts (a resumed run's earlier parts left out).

    Steady state: per worker, the images after its first chunk over the time from the end of its
    first chunk to the end of its last (start-up and the first chunk's warm-up excluded), summed
    over the workers of the attempt that did the most work.
    """
    mine = [p for p in parts if p["launch"] == launch]
    if not mine:
        return {"images_this_run": 0, "chunks_this_run": 0, "steady_state_images_per_second": None,
                "decode_wait_seconds": 0.0, "first_ready_at": None, "all_ready_at": None, "last_finished_at": None}
    by_attempt: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for part in mine:
        by_attempt[part["attempt"]][part["rank"]].append(part)
    busiest = max(by_attempt.values(), key=lambda ranks: sum(p["images"] for ps in ranks.values() for p in ps))
    rates = []
    for worker_parts in busiest.values():
        worker_parts.sort(key=lambda p: p["finished_at"])
        if len(worker_parts) >= 2:
            seconds = worker_parts[-1]["finished_at"] - worker_parts[0]["finished_at"]
            rates.append(sum(p["images"] for p in worker_parts[1:]) / max(seconds, 1e-9))
    ready = [p["worker_ready_at"] for ps in busiest.values() for p in ps]
    return {
        "images_this_run": sum(p["images"] for p in mine),
        "chunks_this_run": len(mine),
        "steady_state_images_per_second": sum(rates) if rates else None,
        # Time workers waited for decoding to finish: near 0 when it overlapped with the model.
        "decode_wait_seconds": sum(p["decode_wait_seconds"] for p in mine),
        "first_ready_at": min(ready),
        "all_ready_at": max(ready),
        "last_finished_at": max(p["finished_at"] for p in mine),
    }
