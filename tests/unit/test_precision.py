"""--precision auto: the faster precision by its own measurement, kept in a cache, re-measured when the
cache is unreadable. (The vote across ranks: tests/e2e/test_precision.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from distvision.models import create
from distvision.precision import choose_precision, precision_cache_file

BATCH = 8


def choose(cache_dir: Path, requested: str = "auto") -> tuple[str, str]:
    torch.manual_seed(0)
    model = create("mlp", num_classes=3, image_size=8)
    return choose_precision(requested, model, "mlp", BATCH, 8, torch.device("cpu"), cache_dir)


def measured_speeds(how: str) -> dict[str, float]:
    return {name: float(speed) for name, speed in re.findall(r"(fp32|bf16) (\d+) img/s", how)}


def test_auto_measures_picks_the_faster_and_caches_it(tmp_path: Path):
    choice, how = choose(tmp_path)
    speeds = measured_speeds(how)
    assert how.startswith("measured") and set(speeds) == {"fp32", "bf16"}
    assert speeds[choice] == max(speeds.values())
    cache_file, key = precision_cache_file(tmp_path, "mlp", 8, BATCH)
    record = json.loads(cache_file.read_text())
    assert record["precision"] == choice and record["key"] == key

    # The next run reads the cache instead of measuring, whatever it says.
    other = "fp32" if choice == "bf16" else "bf16"
    cache_file.write_text(json.dumps(dict(record, precision=other)))
    assert choose(tmp_path) == (other, f"cached, {record['how']}")


def test_an_unreadable_cache_is_measured_again(tmp_path: Path):
    cache_file, _ = precision_cache_file(tmp_path, "mlp", 8, BATCH)
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text("{not json")
    choice, how = choose(tmp_path)
    assert how.startswith("measured")
    assert json.loads(cache_file.read_text())["precision"] == choice


def test_a_requested_precision_is_used_without_measuring(tmp_path: Path):
    assert choose(tmp_path, "bf16") == ("bf16", "requested")
    assert not (tmp_path / "precision").exists()
