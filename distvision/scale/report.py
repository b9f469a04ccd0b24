"""The scale report: results.csv, model.json and report.md (tables and conclusions in plain words)."""

from __future__ import annotations

import csv
import os
import platform
from dataclasses import asdict
from pathlib import Path

from distvision.fileio import write_json_atomic
from distvision.scale.grid import Measurement
from distvision.scale.model import TERM_NAMES, PerformanceModel, Point
from distvision.scale.predict import Prediction
from distvision.scale.settings import ScaleConfig

WITHIN = 0.15  # the model should predict every measured point within this relative error


def machine_description() -> str:
    """CPU model, cores and torch version, for the report's header."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def write_results_csv(path: Path, measurements: list[Measurement]) -> None:
    rows = [m.row() for m in measurements]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_model_json(path: Path, model: PerformanceModel, points: list[Point], errors: list[float],
                     predictions: dict[str, list[Prediction]], recommendation: dict, extra: dict) -> None:
    write_json_atomic(path, {
        **model.to_dict(),
        "max_relative_error": max(errors),
        "points": [dict(asdict(p), predicted_seconds=model.epoch_seconds(p), relative_error=e)
                   for p, e in zip(points, errors, strict=True)],
        "predictions": {name: [asdict(p) for p in rows] for name, rows in predictions.items()},
        "recommendation": recommendation,
        **extra,
    })


def _term_line(model: PerformanceModel, name: str) -> str:
    value, error = model.terms[name], model.uncertainty.get(name)
    scale, unit = (1e9, "ns/byte") if name == "seconds_per_byte" else (1e3, "ms")
    spread = f" ± {error * scale:.3g}" if error is not None else (" (not fitted: from the network)"
                                                                  if name == "seconds_per_byte" else "")
    if name not in model.fitted and name != "seconds_per_byte":
        spread = " (not fitted: not separable in this grid, or it fitted below 0)"
    return f"| {TERM_NAMES[name]} | {value * scale:.4g}{spread} {unit} |"


def serial_fraction_line(fraction: float, samples: int, batch_size: int) -> str:
    """The report's sentence on the serial fraction: none, all, or the Amdahl bound it sets."""
    if fraction == 0:
        return f"Serial fraction at batch {batch_size}: 0%: the fitted model has no part that more workers cannot shorten."
    if fraction >= 1:
        return f"Serial fraction at batch {batch_size}: 100% (no speedup from more workers)."
    return (f"Serial fraction (Amdahl) at D = {samples:,}, batch {batch_size}: {fraction:.1%} of one worker's epoch "
            f"(fixed costs and per-step work), so no number of workers can be more than {1 / fraction:.1f}x faster.")


def write_report_md(path: Path, config: ScaleConfig, measurements: list[Measurement], model: PerformanceModel,
                    points: list[Point], errors: list[float], predictions: dict[str, list[Prediction]],
                    recommendation: dict, context: dict) -> None:
    """report.md of a scaling run: the grid measured, the fitted model, predictions, a recommendation."""
    lines = [
        f"# Scaling report: {config.model}",
        "",
        (f"Machine: {context['machine']}. Load average {context['load_before']} before the runs, "
        f"{context['load_after']} after. Every worker had {config.threads_per_worker} thread(s) at every worker "
        "count, as every node of a cluster brings its own cores: speedups here are what more nodes give, not "
        "what splitting one machine's cores gives."),
        "",
        (f"Grid: workers {config.workers}, training fractions {config.fractions}, global batch {config.batch_sizes}, "
        f"sync {config.syncs} (local SGD every {config.sync_every} steps), {config.epochs} epoch(s), "
        f"{config.repeats} repeat(s), precision {config.precision}. Each point is a real `distvision train` run."),
        "",
        "## Measured",
        "",
        ("Per step (ms, per worker): compute, communication (exchanging and waiting for a slower peer), data "
        "(gathering and augmenting batches), evaluation (the epoch's evaluation spread over its steps)."),
        "",
        ("| workers | samples | batch | sync | repeat | wall s | epoch s | step ms | compute | comm | data | eval "
        "| img/s | MB sent/epoch | test acc |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *_measured_rows(measurements),
        *_model_section(config, model, points, errors, context["samples"]),
        *_prediction_sections(predictions, context["samples"]),
        *_recommendation_section(recommendation, context["plots"]),
    ]
    path.write_text("\n".join(lines))


def _measured_rows(measurements: list[Measurement]) -> list[str]:
    lines = []
    for m in measurements:
        r = m.row()
        lines.append(f"| {r['workers']} | {r['samples']:,} | {r['batch_size']} | {r['sync']} | {r['repeat']} | "
                     f"{r['wall_seconds']:.1f} | {r['epoch_seconds']:.2f} | {r['step_ms']:.1f} | "
                     f"{r['compute_ms_per_step']:.1f} | {r['communication_ms_per_step']:.1f} | "
                     f"{r['data_ms_per_step']:.1f} | {r['eval_ms_per_step']:.1f} | {r['images_per_second']:.0f} | "
                     f"{r['bytes_exchanged'] / 1e6:.1f} | {r['test_accuracy']:.4f} |")
    return lines


def _model_section(config: ScaleConfig, model: PerformanceModel, points: list[Point], errors: list[float],
                   full: int) -> list[str]:
    worst = max(errors)
    lines = [
        "",
        "## Performance model of one epoch",
        "",
        ("T(n, D, B) = a·D/n + b·steps + syncs·(o + 2(n−1)·latency + 2(n−1)/n·bytes·beta) + e/n + s, with "
        "steps = ⌈D/B⌉ and syncs = steps (all-reduce) or ⌈steps/K⌉ (local SGD); fitted by least squares "
        "weighted by 1/T, ± one standard error."),
        "",
        "| term | value |",
        "|---|---|",
        *[_term_line(model, name) for name in TERM_NAMES],
        f"| network latency per hop | {model.network.latency * 1e6:.1f} µs ({model.network.name}) |",
        "",
        "| workers | samples | batch | sync | measured s | predicted s | error |",
        "|---|---|---|---|---|---|---|",
        *[f"| {p.workers} | {p.samples:,} | {p.batch_size} | {p.sync} | {p.seconds:.2f} | "
          f"{model.epoch_seconds(p):.2f} | {e:.1%} |" for p, e in zip(points, errors, strict=True)],
        "",
        f"Largest error {worst:.1%}: every measured point is predicted "
        + (f"within {WITHIN:.0%}." if worst <= WITHIN else f"**not** within {WITHIN:.0%}; see the table."),
        "",
    ]
    for batch_size in config.batch_sizes:
        fraction = model.serial_fraction(full, batch_size)
        lines.append(serial_fraction_line(fraction, full, batch_size))
    unfitted = [TERM_NAMES[name] for name in ("compute_per_step", "sync_overhead") if name not in model.fitted]
    if unfitted:
        # Those are the costs that grow with the worker count at a fixed global batch: a model
        # without them extrapolates only the sharing of compute, and so promises too much.
        lines += ["", (f"Not fitted from this grid: {'; '.join(unfitted)}. Predictions beyond the measured "
                       "worker counts leave them out and are optimistic; a grid with several batch sizes "
                       "(`--batch-sizes 128,512`) and sync modes (`--sync allreduce,local-sgd`) fits them.")]
    return lines


def _prediction_sections(predictions: dict[str, list[Prediction]], full: int) -> list[str]:
    lines = []
    for name, rows in predictions.items():
        lines += ["", f"## Predicted on {name}, D = {full:,}", "",
                  "| sync | batch | workers | epoch s | speedup | efficiency | measured speedup |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {p.sync} | {p.batch_size} | {p.workers} | {p.epoch_seconds:.2f} | {p.speedup:.2f}x | "
                  f"{p.efficiency:.0%} | {f'{p.measured_speedup:.2f}x' if p.measured_speedup else ''} |" for p in rows]
    return lines


def _recommendation_section(recommendation: dict, plots: list[str]) -> list[str]:
    fastest = recommendation["fastest"]
    lines = [
        "",
        "## Recommendation",
        "",
        (f"Fastest epoch on {recommendation['network']}: **{fastest['workers']} worker(s), {fastest['sync']}, batch "
        f"{fastest['batch_size']}** ({fastest['epoch_seconds']} s per epoch, {fastest['speedup']}x, efficiency "
        f"{fastest['efficiency']:.0%})."),
    ]
    for sync, best in recommendation["most_workers_at_good_efficiency"].items():
        lines.append(f"- {sync}: up to {best['workers']} worker(s) (batch {best['batch_size']}) keep efficiency at "
                     f"{recommendation['good_efficiency']:.0%} or better ({best['speedup']}x).")
    lines += [
        "",
        ("Time per epoch is not time to accuracy: a larger batch or local SGD may need more epochs to reach "
        "the same accuracy (`distvision bench` measures that)."),
        "",
        "## Plots",
        "",
        *[f"![{name}]({name})" for name in plots],
        "",
    ]
    return lines
