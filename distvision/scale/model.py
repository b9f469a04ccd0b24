"""The performance model of one epoch, fitted to measured runs by least squares.

    T(n, D, B) = a x D/n                   compute, shared by the workers
               + b x steps                 per-step work every worker repeats (optimizer, Python), if
                                           the grid has several batch sizes to tell it apart
               + syncs x (o + net(n, P))   each synchronisation: a software overhead o (hooks, copies,
                                           waiting for a slower peer) plus the network's ring all-reduce
                                           of P bytes: 2(n-1) x latency + 2(n-1)/n x P x beta
               + e/n                       evaluating the test set, which the workers share
               + s                         serial: fixed per-epoch costs no worker count shortens

steps = ceil(D/B); syncs = steps under all-reduce, ceil(steps/K) under local SGD with period K.
The latency comes from the network (measured here, or given); beta too, unless the grid varies
the bytes per synchronisation enough to fit it. The fit weights every point by 1/T, so it
minimises relative errors, which is what "predicted within 15%" asks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from distvision.config import split_sync, steps_per_round
from distvision.errors import UserError
from distvision.extras import require_extra

with require_extra("scale", "distvision scale"):
    from scipy.optimize import nnls

from distvision.scale.network import Network, hops, wire_bytes

TERM_NAMES = {
    "compute_per_sample": "compute per sample per worker (a)",
    "compute_per_step": "per-step work not shared by workers (b)",
    "sync_overhead": "per synchronisation: software overhead and waiting for the slowest worker (o)",
    "seconds_per_byte": "seconds per byte on the wire (beta)",
    "evaluation": "test-set evaluation, shared by the workers (e)",
    "serial": "serial part per epoch (s)",
}
BYTES_SPREAD_TO_FIT_BETA = 0.25  # relative spread of the bytes per sync that makes beta fittable


@dataclass(frozen=True)
class Point:
    """One configuration's measured epoch (medians over repeats)."""

    workers: int
    samples: int  # training samples in the epoch (D)
    batch_size: int  # global (B)
    sync: str  # a scale --sync spec: allreduce, local-sgd, diloco, with :int8|int4, :fN and :oT
    sync_every: str  # local SGD's and DiLoCo's K (H), or "epoch"
    payload_bytes: float  # bytes each worker puts into one synchronisation
    seconds: float = math.nan  # measured T: training plus evaluation of one epoch

    @property
    def gathered(self) -> bool:
        """Its changes travel as codes (local-sgd:int8, diloco:int4:f4, ...), gathered rather than summed."""
        return split_sync(self.sync)["quantize"] != "none"


def steps_per_epoch(samples: int, batch_size: int) -> int:
    return max(1, math.ceil(samples / batch_size))


def syncs_per_epoch(samples: int, batch_size: int, sync: str, sync_every: str, workers: int) -> int:
    """Synchronisations in one epoch (none alone)."""
    if workers <= 1:
        return 0
    return syncs_in(steps_per_epoch(samples, batch_size), sync, sync_every)


def syncs_in(steps: int, sync: str, sync_every: str) -> int:
    """Synchronisations in an epoch of this many steps: every step (all-reduce), every H (local SGD, DiLoCo),
    or every H/F under Streaming DiLoCo (a fragment each; the epoch's last sends them all)."""
    if sync == "allreduce":
        return steps
    if sync_every == "epoch":
        return 1
    return math.ceil(steps / max(1, steps_per_round(sync_every, split_sync(sync)["fragments"])))


@dataclass
class PerformanceModel:
    terms: dict[str, float]
    uncertainty: dict[str, float | None]  # one standard error per term; None without spare points
    network: Network  # the network the measured runs had
    fitted: list[str] = field(default_factory=list)  # terms the data determined (the rest are 0 or the network's)

    def epoch_seconds(self, point: Point, network: Network | None = None) -> float:
        """Predicted T for a point, on the measured network or another one."""
        network = network or self.network
        syncs = syncs_per_epoch(point.samples, point.batch_size, point.sync, point.sync_every, point.workers)
        transport = network.exchange_seconds(point.workers, point.payload_bytes, point.gathered)
        if network is self.network and "seconds_per_byte" in self.fitted:
            transport = (hops(point.workers, point.gathered) * network.latency
                         + _sent(point) * self.terms["seconds_per_byte"])
        return (self.terms["compute_per_sample"] * point.samples / point.workers
                + self.terms["compute_per_step"] * steps_per_epoch(point.samples, point.batch_size)
                + syncs * (self.terms["sync_overhead"] + transport)
                + self.terms["evaluation"] / point.workers
                + self.terms["serial"])

    def serial_fraction(self, samples: int, batch_size: int) -> float:
        """Amdahl's serial fraction of one worker's epoch: what more workers cannot shorten."""
        unshared = self.terms["serial"] + self.terms["compute_per_step"] * steps_per_epoch(samples, batch_size)
        alone = self.epoch_seconds(Point(1, samples, batch_size, "allreduce", "1", 0.0))
        return min(unshared / alone, 1.0) if alone > 0 else 1.0

    def to_dict(self) -> dict:
        return {"terms": self.terms, "uncertainty": self.uncertainty, "fitted": self.fitted,
                "descriptions": TERM_NAMES,
                "network": {"name": self.network.name, "latency_seconds": self.network.latency,
                            "seconds_per_byte": self.network.seconds_per_byte}}


def fit_model(points: list[Point], network: Network) -> PerformanceModel:
    """Weighted least squares of the model's terms on measured points.

    A UserError if the grid cannot tell the terms apart.
    """
    if not points:
        raise UserError("no measured points to fit the performance model to")
    distributed = [p for p in points if p.workers > 1]
    # Bytes per sync vary with the worker count only in a way close to the latency's; beta needs
    # payloads of clearly different sizes (sync modes, compression, models) to be fitted.
    payloads = np.array([p.payload_bytes for p in distributed])
    columns: dict[str, list[float]] = {"compute_per_sample": [p.samples / p.workers for p in points]}
    if len({p.batch_size for p in points}) > 1:
        columns["compute_per_step"] = [steps_per_epoch(p.samples, p.batch_size) for p in points]
    if distributed:
        columns["sync_overhead"] = [_syncs(p) for p in points]
    fit_beta = (len(payloads) > 1 and payloads.mean() > 0
                and (payloads.max() - payloads.min()) / payloads.mean() > BYTES_SPREAD_TO_FIT_BETA)
    if fit_beta:
        columns["seconds_per_byte"] = [_syncs(p) * _sent(p) for p in points]
    columns["evaluation"] = [1.0 / p.workers for p in points]
    columns["serial"] = [1.0] * len(points)

    measured = np.array([p.seconds for p in points])
    # What the network alone explains is known, not fitted: latency always, bandwidth unless fitted.
    known = np.array([_syncs(p) * hops(p.workers, p.gathered) * network.latency
                      + (0.0 if fit_beta else _syncs(p) * _sent(p) * network.seconds_per_byte) for p in points])
    design = np.array(list(columns.values())).T
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise UserError(
            f"the grid cannot separate the model's terms ({', '.join(columns)}): measure at least two "
            "--fractions and at least two --workers counts (more points than terms give uncertainties)")
    # No term is a negative time: non-negative least squares decides which terms are 0. The others are
    # then the plain least squares on their own columns (the same values), which gives their standard errors.
    weights = 1.0 / measured
    names = [name for name, value in zip(columns, _nonnegative_fit(design, measured - known, weights), strict=True)
             if value > 0]
    solution, uncertainty = _weighted_fit(design[:, [list(columns).index(n) for n in names]],
                                          measured - known, weights, names)
    terms = dict.fromkeys(TERM_NAMES, 0.0)
    terms["seconds_per_byte"] = network.seconds_per_byte
    terms.update({name: float(value) for name, value in zip(names, solution, strict=True)})
    for name in TERM_NAMES:
        uncertainty.setdefault(name, None)
    return PerformanceModel(terms, uncertainty, network, names)


def _nonnegative_fit(design: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Non-negative least squares of target on design's columns, rows weighted (scipy's NNLS).

    The columns differ by many orders of magnitude (samples, bytes, ones): each is scaled to unit norm
    for the solver, whose tolerance is absolute, and the solution scaled back.
    """
    weighted = design * weights[:, None]
    norms = np.linalg.norm(weighted, axis=0)
    norms[norms == 0] = 1.0
    solution, _ = nnls(weighted / norms, target * weights)
    return solution / norms


def _weighted_fit(design: np.ndarray, target: np.ndarray, weights: np.ndarray,
                  names: list[str]) -> tuple[np.ndarray, dict[str, float | None]]:
    """Least squares of target on design's columns, rows weighted; the solution and its standard errors."""
    weighted = design * weights[:, None]
    solution, *_ = np.linalg.lstsq(weighted, target * weights, rcond=None)
    residuals = weighted @ solution - target * weights
    spare = len(target) - design.shape[1]
    if spare <= 0:
        return solution, dict.fromkeys(names)
    covariance = float(residuals @ residuals) / spare * np.linalg.inv(weighted.T @ weighted)
    return solution, {name: float(math.sqrt(max(covariance[i, i], 0.0))) for i, name in enumerate(names)}


def _sent(point: Point) -> float:
    """Bytes each worker puts on its link in one of the point's synchronisations."""
    return wire_bytes(point.workers, point.payload_bytes, point.gathered)


def _syncs(point: Point) -> int:
    return syncs_per_epoch(point.samples, point.batch_size, point.sync, point.sync_every, point.workers)


def relative_errors(model: PerformanceModel, points: list[Point]) -> list[float]:
    """|predicted - measured| / measured per point."""
    return [abs(model.epoch_seconds(p) - p.seconds) / p.seconds for p in points]
