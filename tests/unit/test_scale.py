"""distvision scale: the performance model's fit and predictions, and bad input (a tiny real sweep:
tests/e2e/test_scale.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from distvision.cli import main
from distvision.errors import UserError
from distvision.scale.model import PerformanceModel, Point, fit_model, relative_errors, syncs_per_epoch
from distvision.scale.network import Network, parse_network
from distvision.scale.predict import payload_by_sync, predict, recommend

TRUE_TERMS = {"compute_per_sample": 2e-3, "compute_per_step": 0.02, "sync_overhead": 4e-3,
              "seconds_per_byte": 2e-9, "evaluation": 3.0, "serial": 1.5}
LOCAL = Network(latency=1e-4, seconds_per_byte=1e-9, name="test network")


def synthetic_points(noise: float, seed: int = 0) -> list[Point]:
    """Timings a machine with TRUE_TERMS would give: workers, data and batch sizes, two payload sizes."""
    truth = PerformanceModel(TRUE_TERMS, {}, LOCAL, list(TRUE_TERMS))
    rng = np.random.default_rng(seed)
    points = []
    for workers in (1, 2, 4):
        for samples in (5_000, 20_000, 50_000):
            for batch_size in (128, 512):
                for sync, payload in (("allreduce", 6e5), ("local-sgd", 4e6)):
                    point = Point(workers, samples, batch_size, sync, "4", payload)
                    seconds = truth.epoch_seconds(point) * (1 + rng.normal(0, noise))
                    points.append(Point(workers, samples, batch_size, sync, "4", payload, seconds))
    return points


def test_fit_recovers_known_terms_with_honest_uncertainties():
    model = fit_model(synthetic_points(noise=0.01), LOCAL)
    assert set(model.fitted) == set(TRUE_TERMS)  # payloads of two sizes: beta is fitted too
    for name, true_value in TRUE_TERMS.items():
        error = model.uncertainty[name]
        assert error is not None and error > 0
        # Within 4 standard errors of the truth, and the standard error small against the value.
        assert abs(model.terms[name] - true_value) < 4 * error, (name, model.terms[name], true_value, error)
        assert error < 0.5 * true_value, (name, error)
    assert max(relative_errors(model, synthetic_points(noise=0.01))) < 0.05
    exact = fit_model(synthetic_points(noise=0.0), LOCAL)
    for name, true_value in TRUE_TERMS.items():
        assert exact.terms[name] == pytest.approx(true_value, rel=1e-6)


def test_one_payload_size_takes_beta_from_the_network_and_one_batch_drops_the_step_term():
    points = [p for p in synthetic_points(noise=0.0) if p.sync == "allreduce" and p.batch_size == 512]
    model = fit_model(points, LOCAL)
    assert "seconds_per_byte" not in model.fitted and "compute_per_step" not in model.fitted
    assert model.terms["seconds_per_byte"] == LOCAL.seconds_per_byte
    assert max(relative_errors(model, points)) < 0.02  # the step term folds into the per-sample one


def test_a_term_the_timings_make_negative_is_zero_and_not_fitted():
    # Timings no machine gives (a negative serial part): the fit keeps every term a time, >= 0.
    truth = PerformanceModel(dict(TRUE_TERMS, serial=-0.5), {}, LOCAL, list(TRUE_TERMS))
    points = [Point(p.workers, p.samples, p.batch_size, p.sync, p.sync_every, p.payload_bytes,
                    truth.epoch_seconds(p)) for p in synthetic_points(noise=0.0)]
    model = fit_model(points, LOCAL)
    assert model.terms["serial"] == 0.0 and "serial" not in model.fitted
    assert all(value >= 0 for value in model.terms.values())
    assert {"compute_per_sample", "compute_per_step", "evaluation"} <= set(model.fitted)
    assert max(relative_errors(model, points)) < 0.1


def test_a_grid_that_cannot_separate_the_terms_is_a_user_error():
    one_size = [p for p in synthetic_points(noise=0.0) if p.samples == 50_000 and p.batch_size == 512
                and p.sync == "allreduce"]
    with pytest.raises(UserError, match="cannot separate"):
        fit_model(one_size, LOCAL)


def test_predictions_are_monotonic_and_sane():
    points = synthetic_points(noise=0.0)
    model = fit_model(points, LOCAL)
    workers = [1, 2, 4, 8, 16, 64]
    payloads = {"allreduce": 6e5, "local-sgd": 6e5}
    fast = predict(model, points, 50_000, [512], workers, "4", payloads, parse_network("10gbit,50us"))
    slow = predict(model, points, 50_000, [512], workers, "4", payloads, parse_network("100mbit,1ms"))
    for rows in (fast, slow):
        for sync in ("allreduce", "local-sgd"):
            mine = [p for p in rows if p.sync == sync]
            assert mine[0].workers == 1 and mine[0].speedup == pytest.approx(1.0)
            efficiency = [p.efficiency for p in mine]
            assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(efficiency))
            assert all(0 < p.speedup <= p.workers for p in mine)
    by_key = {(p.sync, p.workers): p for p in fast}
    slow_by_key = {(p.sync, p.workers): p for p in slow}
    for n in workers[1:]:
        # A slower network never helps; averaging every 4 steps costs less than every step.
        assert slow_by_key[("allreduce", n)].epoch_seconds > by_key[("allreduce", n)].epoch_seconds
        assert by_key[("local-sgd", n)].epoch_seconds < by_key[("allreduce", n)].epoch_seconds
    # Amdahl: the serial part bounds every speedup.
    bound = 1 / model.serial_fraction(50_000, 512)
    assert all(p.speedup < bound for p in fast)
    assert recommend(fast)["fastest"]["workers"] > 1  # this workload does scale on a fast network


def test_network_strings():
    network = parse_network("10gbit,50us")
    assert network.seconds_per_byte == pytest.approx(8 / 10e9) and network.latency == pytest.approx(50e-6)
    assert parse_network("100mbit").latency == 0.0
    assert parse_network("1gb/s,1ms").seconds_per_byte == pytest.approx(1e-9)
    for bad in ("fast", "10gbit,50", "10parsecs,1us", "0gbit", "10gbit,1us,2"):
        with pytest.raises(UserError):
            parse_network(bad)


@pytest.mark.parametrize("args, expected", [
    (["scale", "--network", "fast"], "--network 'fast'"),
    (["scale", "--workers", "1,x"], "--workers takes a comma-separated list"),
    (["scale", "--workers", "2,4"], "must include 1"),
    (["scale", "--fractions", "0,1"], "--fractions: 0.0 is out of range"),
    (["scale", "--sync", "allreduce,gossip"], "unknown mode 'gossip'"),
    (["scale", "--model", "nonet"], "unknown model 'nonet'"),
    (["bench", "--problems", "sudoku"], "unknown problem 'sudoku'"),
    (["bench", "--workers", "1,1"], "lists a value twice"),
    (["bench", "--problems", "parity8", "--epochs-for", "parity8=0"], "--epochs-for takes PROBLEM=EPOCHS"),
    (["bench", "--problems", "parity8", "--epochs-for", "digits=3"], "not among the problems run"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected, capsys, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("distvision: error:") and expected in lines[0], lines


def test_the_model_covers_diloco_as_it_covers_local_sgd():
    """DiLoCo synchronises once per period like local SGD, with its own measured payload."""
    assert syncs_per_epoch(10_000, 100, "diloco", "32", 2) == syncs_per_epoch(10_000, 100, "local-sgd", "32", 2) == 4
    assert syncs_per_epoch(10_000, 100, "diloco", "epoch", 4) == 1
    points = [Point(2, 1000, 100, "allreduce", "", 6e5, 1.0), Point(2, 1000, 100, "diloco", "32", 2e6, 1.0)]
    payloads = payload_by_sync(points, fallback_bytes=1.0)
    assert payloads["diloco"] == 2e6 and payloads["allreduce"] == 6e5
    assert payloads["local-sgd"] == pytest.approx((2e6 + 6e5) / 2)  # unmeasured: the measured modes' mean


def test_scale_and_bench_name_quantized_modes_and_their_runs_get_them():
    from distvision.config import split_sync
    from distvision.scale.grid import point_config
    from distvision.scale.model import syncs_in
    from distvision.scale.settings import ScaleConfig, parse_syncs

    assert parse_syncs("allreduce, diloco:int4,local-sgd:int8") == ["allreduce", "diloco:int4", "local-sgd:int8"]
    for bad in ("allreduce:int8", "diloco:int2", "gossip"):
        with pytest.raises(UserError, match="unknown mode"):
            parse_syncs(bad)
    assert split_sync("local-sgd") == {"sync": "local-sgd", "quantize": "none", "fragments": 1, "overlap": 0}
    assert split_sync("diloco:int4:f4:o2") == split_sync("diloco:o2:f4:int4") == {
        "sync": "diloco", "quantize": "int4", "fragments": 4, "overlap": 2}
    assert split_sync("diloco:int4:f4:o2", alone=True) == {"sync": "diloco"}
    assert parse_syncs("diloco:f2,diloco:int8:f4:o1", sync_every="32") == ["diloco:f2", "diloco:int8:f4:o1"]
    for bad, why in (("local-sgd:f2", "unknown mode"), ("diloco:f0", "unknown mode"), ("diloco:int4:int8", "unknown mode"),
                     ("local-sgd:o1", "unknown mode"), ("diloco:f3", "a multiple of it"), ("diloco:f4:o8", "H/F - 1 = 7")):
        with pytest.raises(UserError, match=why):
            parse_syncs(bad, sync_every="32")
    streaming = point_config(ScaleConfig(data=None, sync_every="32"), "diloco:int4:f4", 100, 2, 0.5)
    assert (streaming.sync, streaming.quantize, streaming.fragments) == ("diloco", "int4", 4)
    streaming.validate()
    assert syncs_in(100, "diloco:int4:f4", "32") == 13 and syncs_in(100, "diloco:int4", "32") == 4
    point = point_config(ScaleConfig(data=None, sync_every="32"), "diloco:int4", 100, 2, 0.5)
    assert (point.sync, point.quantize, point.sync_every) == ("diloco", "int4", "32")
    point.validate()  # a quantized DiLoCo run the train command accepts
    alone = point_config(ScaleConfig(data=None, sync_every="32"), "local-sgd:int8", 100, 1, 0.5)
    assert alone.quantize == "none"  # one worker sends nothing: its run takes the restart path, which has no codes


def test_quantized_codes_are_gathered_so_beyond_two_workers_they_cost_more_a_byte():
    """Two workers send P either way; at n, an all-gather sends (n-1) P where a ring all-reduce sends
    2(n-1)/n P, and takes n-1 more latency-paying hops."""
    from distvision.scale.network import hops, wire_bytes

    assert wire_bytes(2, 1e6, gathered=True) == wire_bytes(2, 1e6) == 1e6
    assert wire_bytes(4, 1e6) == 1.5e6 and wire_bytes(4, 1e6, gathered=True) == 3e6
    assert (hops(4), hops(4, gathered=True), hops(1, gathered=True)) == (6, 9, 0)
    model = PerformanceModel(TRUE_TERMS, {}, LOCAL, [])
    summed, coded = (Point(4, 50_000, 512, sync, "32", 1e6) for sync in ("diloco", "diloco:int4"))
    assert coded.gathered and not summed.gathered
    slow = parse_network("10mbit,1ms")  # 8e-7 s a byte
    syncs = syncs_per_epoch(50_000, 512, "diloco", "32", 4)  # 98 steps: 4
    extra = model.epoch_seconds(coded, slow) - model.epoch_seconds(summed, slow)
    assert extra == pytest.approx(syncs * (3 * 1e-3 + 1.5e6 * 8e-7))
    assert syncs_per_epoch(50_000, 512, "diloco:int4:f4", "32", 4) == 13  # a fragment every 8 steps
