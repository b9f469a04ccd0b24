"""Speedup and efficiency for more workers than were measured, per sync mode, and a recommendation."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from distvision.config import SYNC_MODES
from distvision.scale.model import PerformanceModel, Point
from distvision.scale.network import Network

GOOD_EFFICIENCY = 0.7  # "worth the extra machines" threshold for the recommendation


@dataclass(frozen=True)
class Prediction:
    sync: str
    batch_size: int
    workers: int
    epoch_seconds: float
    speedup: float
    efficiency: float
    measured_speedup: float | None  # where both this point and its one-worker point were measured


def payload_by_sync(points: list[Point], fallback_bytes: float) -> dict[str, float]:
    """Measured bytes per synchronisation for each sync mode (local SGD averages about what all-reduce sends)."""
    measured = {}
    for sync in SYNC_MODES:
        values = [p.payload_bytes for p in points if p.sync == sync and p.workers > 1]
        if values:
            measured[sync] = statistics.median(values)
    default = statistics.fmean(measured.values()) if measured else fallback_bytes
    return {sync: measured.get(sync, default) for sync in SYNC_MODES}


def predict(model: PerformanceModel, points: list[Point], samples: int, batch_sizes: list[int],
            workers: list[int], sync_every: str, payloads: dict[str, float],
            network: Network | None = None) -> list[Prediction]:
    """Predicted epoch time, speedup and efficiency over workers, for each sync mode and every batch size."""
    measured = {(p.sync, p.batch_size, p.workers): p.seconds for p in points if p.samples == samples}
    predictions = []
    for sync, payload in payloads.items():  # every sync mode with a payload (payload_by_sync gives them all)
        for batch_size in batch_sizes:
            def at(n: int, sync=sync, batch_size=batch_size, payload=payload) -> float:
                return model.epoch_seconds(Point(n, samples, batch_size, sync, sync_every, payload), network)

            alone = at(1)
            for n in sorted(set(workers) | {1}):
                seconds = at(n)
                measured_alone = measured.get(("allreduce", batch_size, 1), measured.get((sync, batch_size, 1)))
                measured_here = measured.get((sync, batch_size, n))
                measured_speedup = (measured_alone / measured_here
                                    if measured_alone and measured_here and n > 1 else None)
                predictions.append(Prediction(sync, batch_size, n, seconds, alone / seconds, alone / seconds / n,
                                              measured_speedup))
    return predictions


def recommend(predictions: list[Prediction]) -> dict:
    """The fastest configuration, and per sync mode the most workers still at GOOD_EFFICIENCY or better."""
    fastest = min(predictions, key=lambda p: (p.epoch_seconds, p.workers))
    efficient = {}
    for sync in sorted({p.sync for p in predictions}):
        good = [p for p in predictions if p.sync == sync and p.efficiency >= GOOD_EFFICIENCY]
        if good:
            best = max(good, key=lambda p: (p.workers, -p.epoch_seconds))
            efficient[sync] = {"workers": best.workers, "batch_size": best.batch_size,
                               "speedup": round(best.speedup, 2), "efficiency": round(best.efficiency, 3)}
    return {"fastest": {"sync": fastest.sync, "batch_size": fastest.batch_size, "workers": fastest.workers,
                        "epoch_seconds": round(fastest.epoch_seconds, 2), "speedup": round(fastest.speedup, 2),
                        "efficiency": round(fastest.efficiency, 3)},
            "most_workers_at_good_efficiency": efficient, "good_efficiency": GOOD_EFFICIENCY}
