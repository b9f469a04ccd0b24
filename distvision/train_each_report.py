"""What `distvision train-each` reports: subsets.csv, summary.json and the comparison plot.

Every row is read back from the run folders, so subsets other processes trained count too. With
--compare-global the global model is scored on each subset's own test images twice: with all
classes competing (as a model that does not know where an image comes from), and among the
subset's classes only (knowing the subset, as each subset model does), so the two kinds of model
are also compared on equal terms.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from distvision.data.prepare import open_prepared
from distvision.data.subsets import GLOBAL_NAME, Subset, union_test_slices
from distvision.extras import missing
from distvision.fileio import write_json_atomic
from distvision.metrics import say

# New columns go last, so that readers by position keep working.
CSV_COLUMNS = ["subset", "samples", "classes", "test_accuracy", "global_test_accuracy", "epochs", "seconds", "host",
               "global_test_accuracy_subset_classes"]


def collect_rows(subsets: list[Subset], out: Path) -> list[dict]:
    """One row per finished run out/<subset>, read from disk: runs other processes trained count too."""
    rows = []
    for subset in subsets:
        run_dir = out / subset.name
        if not (run_dir / "summary.json").is_file():
            continue
        summary = json.loads((run_dir / "summary.json").read_text())
        pool = json.loads((run_dir / "train-each.json").read_text()) if (run_dir / "train-each.json").is_file() else {}
        rows.append({
            "subset": subset.name, "samples": subset.samples, "classes": len(subset.classes),
            "test_accuracy": summary["test_accuracy"], "global_test_accuracy": None,
            "global_test_accuracy_subset_classes": None,
            "epochs": summary["epochs"], "seconds": pool.get("seconds"), "host": pool.get("host"),
            "core_seconds": pool.get("core_seconds"),
        })
    return rows


def correct_predictions(logits: torch.Tensor, labels: torch.Tensor, among: Sequence[int] | None = None) -> int:
    """How many rows of (N, classes) logits have their label as the top class.

    With `among` (class indices), only those classes' logits compete: the prediction of a model told
    that the image belongs to one of them.
    """
    if among is None:
        predictions = logits.argmax(1)
    else:
        allowed = torch.as_tensor(list(among), dtype=torch.long, device=logits.device)
        predictions = allowed[logits.index_select(1, allowed).argmax(1)]
    return int((predictions == labels.to(logits.device)).sum())


def add_global_accuracy(rows: list[dict], subsets: list[Subset], global_run: Path, union_data: Path) -> None:
    """The global model's accuracy on each subset's own test images: all classes competing
    (global_test_accuracy), and only the subset's classes (global_test_accuracy_subset_classes)."""
    from distvision.evaluate import EVAL_CHUNK
    from distvision.inference import load_inference_model

    loaded = load_inference_model(global_run)
    union = open_prepared(union_data)
    union_class = {name: index for index, name in enumerate(union.classes)}
    by_name = {row["subset"]: row for row in rows}
    parts = union_test_slices(subsets)
    for subset in subsets:
        if subset.name not in by_name:  # not trained (yet): nothing to compare with
            continue
        part = parts[subset.name]
        among = [union_class[name] for name in subset.classes]
        correct = correct_among = 0
        # The chunks evaluate_part uses, so all-classes accuracy is the number it would give.
        for start in range(part.start, part.stop, EVAL_CHUNK):
            chunk = np.arange(start, min(start + EVAL_CHUNK, part.stop))
            logits = loaded.logits(union.test_images[chunk])
            labels = torch.from_numpy(union.test_labels[chunk])
            correct += correct_predictions(logits, labels)
            correct_among += correct_predictions(logits, labels, among)
        count = max(part.stop - part.start, 1)
        by_name[subset.name]["global_test_accuracy"] = correct / count
        by_name[subset.name]["global_test_accuracy_subset_classes"] = correct_among / count


def plot_comparison(rows: list[dict], path: Path) -> None:
    """Bars per subset: its own model, and the global model with all classes and with the subset's; skipped,
    with a note, without matplotlib (subsets.csv holds the same numbers)."""
    if reason := missing("matplotlib", "plots"):
        say(f"train-each: no {path.name}: {reason}")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["subset"] != GLOBAL_NAME and r["global_test_accuracy"] is not None]
    positions = np.arange(len(shown))
    figure, axes = plt.subplots(figsize=(max(7, 1.8 * len(shown) + 2), 4.5))
    bars = (("test_accuracy", "subset model"), ("global_test_accuracy", "global model, all classes"),
            ("global_test_accuracy_subset_classes", "global model, the subset's classes"))
    width = 0.8 / len(bars)
    for i, (column, label) in enumerate(bars):
        axes.bar(positions + (i - 1) * width, [r[column] for r in shown], width, label=label)
    axes.set_xticks(positions, [r["subset"] for r in shown])
    axes.set_ylabel("test accuracy on the subset's test split")
    axes.set_ylim(0, 1)
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(bars), fontsize="small", frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_outputs(out: Path, rows: list[dict], subsets: list[Subset], failed: list[str], wall: float,
                  pool_seconds: float) -> None:
    """subsets.csv and summary.json in out, and a closing line."""
    with open(out / "subsets.csv.tmp", "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(out / "subsets.csv.tmp", out / "subsets.csv")
    core_seconds = sum(r["core_seconds"] or 0 for r in rows)
    cores = len(os.sched_getaffinity(0))
    write_json_atomic(out / "summary.json", {
        "subsets": rows,
        "trained": [r["subset"] for r in rows],
        "not_trainable": {s.name: s.problem for s in subsets if s.problem},
        "failed": failed,
        "wall_seconds": round(wall, 2),  # everything, data preparation and comparison included
        "pool_seconds": round(pool_seconds, 2),  # from the first job's start to the last one's end
        "job_core_seconds": round(core_seconds, 2),
        # The ideal pool: every core busy all the time (meaningful when this process ran every job).
        "ideal_pool_seconds": round(core_seconds / cores, 2),
        "cores": cores,
    })
    say(f"train-each: {len(rows)} model(s) trained, {len(failed)} failed, "
        f"{sum(1 for s in subsets if s.problem)} subset(s) not trainable; {wall:.0f}s wall; "
        f"see {out / 'subsets.csv'}")
