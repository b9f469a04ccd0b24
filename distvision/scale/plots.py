"""The scale report's PNG plots (matplotlib, no display needed; without it, none)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distvision.extras import missing
from distvision.metrics import say
from distvision.scale.model import PerformanceModel, Point
from distvision.scale.predict import Prediction


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(out: Path, model: PerformanceModel, points: list[Point], predictions: list[Prediction],
                samples: int, sync_every: str) -> list[str]:
    """Four plots into out; returns their file names (none, after a note, without matplotlib)."""
    if reason := missing("matplotlib", "plots"):
        say(f"distvision scale: no plots: {reason}")
        return []
    plt = _pyplot()
    names = []
    configurations = sorted({(p.sync, p.batch_size) for p in points})

    # 1. Time per epoch vs training-set size, one line per worker count (measured dots, model lines).
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for sync, batch_size in configurations:
        for n in sorted({p.workers for p in points}):
            mine = sorted((p for p in points if (p.sync, p.batch_size, p.workers) == (sync, batch_size, n)),
                          key=lambda p: p.samples)
            if not mine:
                continue
            label = f"{n} worker(s), {sync}, batch {batch_size}"
            dots = axes.plot([p.samples for p in mine], [p.seconds for p in mine], "o", label=label)
            sizes = np.linspace(min(p.samples for p in mine) * 0.8, samples, 50)
            axes.plot(sizes, [model.epoch_seconds(Point(n, int(d), batch_size, sync, sync_every,
                                                        mine[0].payload_bytes)) for d in sizes],
                      "-", color=dots[0].get_color(), alpha=0.6)
    axes.set(xlabel="training samples per epoch (D)", ylabel="seconds per epoch (train + eval)",
             title="Time vs data set size (dots measured, lines model)")
    axes.legend(fontsize=8)
    names.append(_save(figure, out / "time_vs_dataset.png"))

    # 2 and 3. Speedup and efficiency vs workers, per sync mode and batch size, with the ideal.
    for quantity, filename in (("speedup", "speedup.png"), ("efficiency", "efficiency.png")):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        workers = sorted({p.workers for p in predictions})
        for sync, batch_size in sorted({(p.sync, p.batch_size) for p in predictions}):
            mine = sorted((p for p in predictions if (p.sync, p.batch_size) == (sync, batch_size)),
                          key=lambda p: p.workers)
            line = axes.plot([p.workers for p in mine], [getattr(p, quantity) for p in mine], "-",
                             label=f"model: {sync}, batch {batch_size}")
            seen = [p for p in mine if p.measured_speedup]
            if seen:
                values = [p.measured_speedup if quantity == "speedup" else p.measured_speedup / p.workers
                          for p in seen]
                axes.plot([p.workers for p in seen], values, "o", color=line[0].get_color(),
                          label=f"measured: {sync}, batch {batch_size}")
        axes.plot(workers, workers if quantity == "speedup" else [1.0] * len(workers), "k--", label="ideal")
        axes.set_xscale("log", base=2)
        if quantity == "speedup":
            axes.set_yscale("log", base=2)
        axes.set(xlabel="workers", ylabel=quantity, title=f"{quantity.capitalize()} vs workers, D = {samples:,}")
        axes.legend(fontsize=8)
        names.append(_save(figure, out / filename))

    # 4. Time per epoch vs batch size at the full data set, per worker count.
    figure, axes = plt.subplots(figsize=(7, 4.5))
    batches = sorted({p.batch_size for p in points})
    grid = np.unique(np.geomspace(max(min(batches) / 4, 8), max(batches) * 4, 25).astype(int))
    syncs = sorted({p.sync for p in points})
    for n in sorted({p.workers for p in predictions}):
        payload = next((p.payload_bytes for p in points if p.workers > 1), 0.0)
        line = axes.plot(grid, [model.epoch_seconds(Point(n, samples, int(b), syncs[0], sync_every, payload))
                                for b in grid], "-", label=f"model: {n} worker(s), {syncs[0]}")
        seen = [p for p in points if p.workers == n and p.samples == samples and p.sync == syncs[0]]
        if seen:
            axes.plot([p.batch_size for p in seen], [p.seconds for p in seen], "o", color=line[0].get_color())
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set(xlabel="global batch size", ylabel="seconds per epoch",
             title=f"Time per epoch vs batch, D = {samples:,} (lines model, dots measured)")
    axes.legend(fontsize=7)
    names.append(_save(figure, out / "time_vs_batch.png"))
    return names


def _save(figure, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path.name
