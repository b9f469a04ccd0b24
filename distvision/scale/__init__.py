"""`distvision scale`: measure training over a grid of worker counts, data sizes and batch sizes,
fit a performance model, and predict speedup for larger clusters and other networks."""

from __future__ import annotations

import os
from pathlib import Path

from distvision.scale.settings import ScaleConfig


def run_scale(config: ScaleConfig) -> dict:
    """Run the grid, fit the model, write the report into config.out; return model.json's headline values."""
    from distvision.data.prepare import default_cache_dir, ensure_prepared
    from distvision.metrics import say
    from distvision.models.registry import count_parameters, create
    from distvision.scale.grid import grid_points, median_points, run_grid
    from distvision.scale.model import fit_model, relative_errors
    from distvision.scale.network import measure_local_network, parse_network
    from distvision.scale.plots import write_plots
    from distvision.scale.predict import payload_by_sync, predict, recommend
    from distvision.scale.report import (
        machine_description,
        write_model_json,
        write_report_md,
        write_results_csv,
    )
    from distvision.scale.settings import validate

    validate(config)
    given_network = parse_network(config.network) if config.network else None
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.data:  # bad data fails here, once, not in every run
        cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        ensure_prepared(Path(config.data), config.image_size, cache_dir)
    load_before = _load()
    local = measure_local_network()
    say(f"distvision scale: local network {local.latency * 1e6:.0f} µs per hop, "
        f"{1e-9 / local.seconds_per_byte:.2f} GB/s; {len(grid_points(config)) * config.repeats} runs")

    def progress(m) -> None:
        p = m.point
        say(f"distvision scale: {p.workers} worker(s), {p.samples} samples, batch {p.batch_size}, {p.sync}: "
            f"{m.epoch_seconds:.2f} s per epoch, {m.images_per_second:.0f} img/s, {m.wall_seconds:.1f} s wall")

    measurements = run_grid(config, out, progress)
    load_after = _load()
    points = median_points(measurements)
    model = fit_model(points, local)
    errors = relative_errors(model, points)
    samples = max(p.samples for p in points)
    fallback = 4.0 * count_parameters(create(config.model))
    payloads = payload_by_sync(points, fallback)
    workers = sorted(set(config.workers) | set(config.predict_workers))
    predictions = {f"the network measured here ({local.latency * 1e6:.0f} µs, "
                   f"{1e-9 / local.seconds_per_byte:.2f} GB/s)":
                   predict(model, points, samples, config.batch_sizes, workers, config.sync_every, payloads)}
    if given_network:
        predictions[f"a {given_network.name} network"] = predict(
            model, points, samples, config.batch_sizes, workers, config.sync_every, payloads, given_network)
    target_name, target_rows = list(predictions.items())[-1]
    recommendation = dict(recommend(target_rows), network=target_name)
    plots = write_plots(out, model, points, target_rows, samples, config.sync_every)
    context = {"machine": machine_description(), "load_before": load_before, "load_after": load_after,
               "samples": samples, "plots": plots}
    write_results_csv(out / "results.csv", measurements)
    serial = {str(b): model.serial_fraction(samples, b) for b in config.batch_sizes}
    extra = {"serial_fraction": serial, "machine": context["machine"], "load_average": [load_before, load_after],
             "threads_per_worker": config.threads_per_worker, "samples": samples,
             "local_network": {"latency_seconds": local.latency, "seconds_per_byte": local.seconds_per_byte}}
    write_model_json(out / "model.json", model, points, errors, predictions, recommendation, extra)
    write_report_md(out / "report.md", config, measurements, model, points, errors, predictions, recommendation,
                    context)
    return {"max_relative_error": max(errors), "recommendation": recommendation, "out": str(out)}


def _load() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())
